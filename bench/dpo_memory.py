"""Peak memory of a LoRA DPO step (the reference = the adapter switched off) against a LoRA SFT step on the same
tokens: the 2B rows of B pairs (chosen and rejected), the answer being the second half of every row.

    flock /tmp/nanolora-bench.lock python bench/dpo_memory.py          # tiny to small GPT shapes on CPU

Each step (forward, backward, AdamW) runs in a fresh process, DPO and SFT interleaved per shape; the peak is that
process's RSS above an idle child's (CPU) or the peak allocated bytes (CUDA). DPO adds one forward under no_grad
whose logits are freed before the policy's forward, so its peak should be the SFT step's plus a little.
"""
import argparse


import torch  # noqa: E402

from bench.common import add_common_args, environment, make_gpt, markdown_table, resolve_args, save_results  # noqa: E402
from bench.timing import idle_baseline_bytes, run_isolated  # noqa: E402

SHAPES = [(2, 2, 128), (4, 4, 256), (6, 6, 384)]  # (n_layer, n_head, n_embd): tiny to small


def step(cfg, objective):
    import objectives.dpo as dpo
    from lora import LoRAConfig, apply_lora, lora_disabled
    model = make_gpt(cfg)
    apply_lora(model, LoRAConfig(r=16, alpha=32, targets=cfg["targets"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (2 * cfg["B"], cfg["T"] + 1), generator=g)  # chosen, then rejected
    x, y = ids[:, :-1].to(cfg["device"]), ids[:, 1:].clone()
    y[:, : cfg["T"] // 2] = -1  # the prompt: the first half of every row
    y = y.to(cfg["device"])
    for _ in range(2):  # the second step has the optimizer state in memory too
        optimizer.zero_grad(set_to_none=True)
        if objective == "sft":
            _, loss = model(x, y)
        else:
            with torch.no_grad(), lora_disabled(model):  # the reference: the adapter switched off
                ref = dpo.sequence_logps(model(x)[0], y)
            losses, _, _ = dpo.dpo_loss(dpo.sequence_logps(model(x)[0], y), ref)
            loss = losses.mean()
        loss.backward()
        optimizer.step()
    return {}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.set_defaults(B=2, T=128)
    cfg = resolve_args(parser.parse_args())
    idle = idle_baseline_bytes(cfg)
    rows = []
    for n_layer, n_head, n_embd in SHAPES:
        shape = dict(cfg, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        peak = {obj: run_isolated(step, shape, obj)["peak_mem"] - idle for obj in ("sft", "dpo")}
        rows.append(dict(shape=f"{n_layer}L {n_embd}d", pairs=cfg["B"], rows=2 * cfg["B"], T=cfg["T"],
                         sft_mib=peak["sft"] / 2**20, dpo_mib=peak["dpo"] / 2**20, ratio=peak["dpo"] / peak["sft"]))
        print(rows[-1], flush=True)
    columns = [("shape", "shape", None), ("pairs", "pairs", None), ("rows", "rows", None), ("T", "T", None),
               ("LoRA SFT step peak MiB", "sft_mib", None), ("LoRA DPO step peak MiB", "dpo_mib", None),
               ("DPO / SFT", "ratio", lambda r: f"{r:.3f}")]
    table = markdown_table(rows, columns)
    print(table)
    save_results(cfg["out_dir"], "dpo_memory", environment(cfg["device"], cfg["threads"]), cfg, rows, table,
                 command="flock /tmp/nanolora-bench.lock python bench/dpo_memory.py")


if __name__ == "__main__":
    main()
