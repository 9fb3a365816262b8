"""Peak memory of a LoRA DPO step (the reference = the adapter switched off) against a LoRA SFT step on the same
tokens: the 2B rows of B pairs (chosen and rejected), the answer being the second half of every row.

    python bench/dpo_memory.py          # tiny to small GPT shapes on CPU

Rows, each step (forward, backward, AdamW, twice) in a fresh process, per shape:
  sft        model(x, y): the chunked linear + cross-entropy (train.py's default loss), no (N, V) logits kept
  sft-plain  the same with loss_chunk_size = 0: full logits, then F.cross_entropy (the loss path DPO takes)
  dpo        objectives/dpo.py as train.py runs it: the reference's logits under no_grad with the adapter off,
             reduced to sequence log-probs and freed, then the policy's full logits and their log-softmax
The peak is the process's RSS above an idle child's (CPU) or the peak allocated bytes (CUDA). On CPU every row
fixes glibc's mmap threshold at --mmap_threshold bytes (default 64 KiB, train.py's cpu_mmap_threshold=65536), so
that a freed tensor leaves the process and the peak is that of the tensors alive together, not of the heap glibc
keeps. DPO on the full-logits path against SFT on it: the reference adds only its sequence log-probs, so the ratio
should be about 1; against the chunked SFT step DPO pays for the (N, V) logits the chunked loss never forms.
"""
import argparse
import sys

import torch  # noqa: E402

from bench.common import add_common_args, environment, make_gpt, markdown_table, resolve_args, save_results  # noqa: E402
from bench.timing import idle_baseline_bytes, run_isolated  # noqa: E402

def mib(b):
    return f"{b:.1f}"


def ratio(r):
    return f"{r:.3f}"


SHAPES = [(2, 2, 128), (4, 4, 256), (6, 6, 384)]  # (n_layer, n_head, n_embd): tiny to small


def step(cfg, objective):
    import objectives.dpo as dpo
    from lora import LoRAConfig, apply_lora, lora_disabled
    from training.memory import set_cpu_mmap_threshold
    if not cfg["device"].startswith("cuda") and cfg["mmap_threshold"]:
        set_cpu_mmap_threshold(cfg["mmap_threshold"])
    model = make_gpt(cfg)
    model.loss_chunk_size = 0 if objective == "sft-plain" else model.loss_chunk_size
    apply_lora(model, LoRAConfig(r=16, alpha=32, targets=cfg["targets"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (2 * cfg["B"], cfg["T"] + 1), generator=g)  # chosen, then rejected
    x, y = ids[:, :-1].to(cfg["device"]), ids[:, 1:].clone()
    y[:, : cfg["T"] // 2] = -1  # the prompt: the first half of every row
    y = y.to(cfg["device"])
    for _ in range(2):  # the second step has the optimizer state in memory too
        optimizer.zero_grad(set_to_none=True)
        if objective != "dpo":
            _, loss = model(x, y)
        else:
            with torch.no_grad(), lora_disabled(model):  # the reference: the adapter switched off
                ref = dpo.sequence_logps(model(x)[0], y)
            losses, _, _ = dpo.dpo_loss(dpo.sequence_logps(model(x)[0], y), ref)
            loss = losses.mean()
        loss.backward()
        optimizer.step()
    return {}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--mmap_threshold", type=int, default=65536,
                        help="CPU: glibc's mmap threshold in bytes for every row (0 = glibc's own moving threshold)")
    parser.set_defaults(B=2, T=128)
    argv = sys.argv[1:] if argv is None else argv
    cfg = resolve_args(parser.parse_args(argv))
    idle = idle_baseline_bytes(cfg)
    rows = []
    for n_layer, n_head, n_embd in SHAPES:
        shape = dict(cfg, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        peak = {obj: run_isolated(step, shape, obj)["peak_mem"] - idle for obj in ("sft", "sft-plain", "dpo")}
        rows.append(dict(shape=f"{n_layer}L {n_embd}d", pairs=cfg["B"], rows=2 * cfg["B"], T=cfg["T"],
                         sft_mib=peak["sft"] / 2**20, plain_mib=peak["sft-plain"] / 2**20, dpo_mib=peak["dpo"] / 2**20,
                         ratio_plain=peak["dpo"] / peak["sft-plain"], ratio=peak["dpo"] / peak["sft"]))
        print(rows[-1], flush=True)
    columns = [("shape", "shape", None), ("pairs", "pairs", None), ("rows", "rows", None), ("T", "T", None),
               ("LoRA SFT step peak MiB (chunked loss)", "sft_mib", mib), ("LoRA SFT, full logits", "plain_mib", mib),
               ("LoRA DPO step peak MiB", "dpo_mib", mib), ("DPO / SFT full logits", "ratio_plain", ratio),
               ("DPO / SFT chunked", "ratio", ratio)]
    table = markdown_table(rows, columns)
    print(table)
    save_results(cfg["out_dir"], "dpo_memory", environment(cfg["device"], cfg["threads"]), cfg, rows, table,
                 command=" ".join(["python", "bench/dpo_memory.py", *argv]))


if __name__ == "__main__":
    main()
