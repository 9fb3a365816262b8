"""What a quantized frozen base (quant/quantize.py) saves and costs: fp32 vs NF4 vs int8 under LoRA.

    python bench/qlora.py                       # CPU: GPT-2 124M shapes, B=2, T=128; a LLaMA shape; the trained base
    python bench/qlora.py --base out-shakespeare --data_dir data/shakespeare
    python bench/qlora.py --base models/smollm2-135m-instruct --data_dir data/shakespeare_romances_smollm2-135m-instruct \
        --shapes ''                             # QLoRA's base: SmolLM2 in fp32 / nf4 / int8 on The Tempest

1. storage: bytes per weight of the quantized Linear layers, and of the whole model (embeddings, norms, biases
   and the tied head stay fp32); the quantization error mean |W - deq(W)| / mean |W| over those weights.
2. quality: val loss of a trained base (--base, e.g. the Shakespeare model of config/shakespeare_cpu.py) in fp32,
   nf4 and int8, and the logits of LoRA on the NF4 base merged (dequantize(W) + s B A, full precision) and merged
   then re-quantized, against the unmerged model.
3. a LoRA training step (r=16 on every Linear of the blocks, split, fused AdamW) on each base: time, the three
   bases interleaved round by round (bench/vs_peft.py's scheme) with paired ratios against the fp32 base; and
   peak memory, each base in a fresh process that loads it from a Hugging Face folder (quantizing while loading)
   and then trains: the peak RSS of loading, what the loaded model keeps resident, and the peak RSS of the steps
   (Linux: the peak is reset between the two through /proc/self/clear_refs; glibc's mmap threshold fixed at
   64 KiB, as train.py's cpu_mmap_threshold=65536, so that the dequantized weights freed after each layer leave). GPT-2 124M shapes with
   random weights (timing and memory do not depend on the values), and a LLaMA shape.
The numbers and what they are compared with: bench/README.md.
"""
import argparse
import os
import shutil
import sys
import tempfile


import torch  # noqa: E402

from bench import common, timing  # noqa: E402
from bench.vs_peft import adamw, paired  # noqa: E402
from tools.resident import status_kib  # noqa: E402

BASES = ("fp32", "nf4", "int8")
LLAMA_SHAPE = dict(vocab_size=32000, n_embd=2048, intermediate_size=5632, n_layer=2, n_head=32, n_kv_head=4,
                   max_seq_len=2048)  # TinyLlama-1.1B's layer shapes, 2 of its 22 layers
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MiB = 2 ** 20


# ---- models -------------------------------------------------------------------------------------------------------
def random_model(cfg, family):
    """GPT-2 of cfg's shape, or the LLaMA shape, with its random init (seeded)."""
    torch.manual_seed(0)
    if family == "gpt2":
        return common.make_gpt(cfg)
    from model import LLaMA, LLaMAConfig
    return LLaMA(LLaMAConfig(**LLAMA_SHAPE))


def targets(cfg, family):
    return cfg["targets"] if family == "gpt2" else LLAMA_TARGETS


def with_base(model, base):
    from quant import quantize
    return model if base == "fp32" else quantize(model, base)


def add_lora(model, cfg, family):
    from lora import LoRAConfig, apply_lora
    return apply_lora(model, LoRAConfig(r=cfg["r"], alpha=cfg["alpha"], targets=targets(cfg, family)))


def batch(cfg, family):
    vocab = cfg["vocab_size"] if family == "gpt2" else LLAMA_SHAPE["vocab_size"]
    return common.random_batch(dict(cfg, vocab_size=vocab))


# ---- 1. storage and error -----------------------------------------------------------------------------------------
@torch.no_grad()
def storage_rows(model, label):
    """Bytes per weight and relative error for each method, over the Linear layers quantize() replaces."""
    from quant import QUANTIZERS, quantizable
    names = quantizable(model)
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    n_model = sum(p.numel() for p in model.parameters())
    rows = []
    for method, quantizer in QUANTIZERS.items():
        nbytes = n = err = mag = 0.0
        for name in names:
            w = model.get_submodule(name).weight
            q = quantizer(w)
            nbytes += q.nbytes()
            n += w.numel()
            err += (w - q.dequantize()).abs().sum().item()
            mag += w.abs().sum().item()
        linear_fp32 = n * 4
        model_bytes = full - linear_fp32 + nbytes
        rows.append(dict(model=label, method=method, weights=int(n), bytes_per_weight=nbytes / n,
                         bits_per_weight=8 * nbytes / n, model_bytes_per_param=model_bytes / n_model,
                         model_mib=model_bytes / MiB, fp32_model_mib=full / MiB, rel_error=err / mag))
    return rows


# ---- 2. quality on a trained base ---------------------------------------------------------------------------------
@torch.no_grad()
def val_loss(model, loader, n_batches):
    model.eval()
    loader.reset()
    return sum(model(*loader.next_batch())[1].item() for _ in range(n_batches)) / n_batches


@torch.no_grad()
def quality(cfg):
    """Val loss of the trained base per method; merged vs unmerged logits of LoRA on its NF4 version."""
    from training.checkpoint import load_model
    from loaders.tokens import DataLoaderLite
    from lora import lora_layers, merge_and_unload
    from quant import dequantize, quantize
    loader = DataLoaderLite(cfg["data_dir"], 8, cfg["val_T"], 0, 1, split="val")
    losses = {base: val_loss(load_model(cfg["base"], quantize="" if base == "fp32" else base), loader,
                             cfg["val_batches"]) for base in BASES}
    model = load_model(cfg["base"], quantize="nf4")
    add_lora(model, cfg, "gpt2" if model.model_type == "gpt2" else "llama")
    torch.manual_seed(1)
    for _, layer in lora_layers(model):  # an adapter that changes the model: B ~ N(0, 0.02), as after training
        layer.lora_B.normal_(std=0.02)
    loader.reset()
    idx, _ = loader.next_batch()
    model.eval()
    unmerged = model(idx)[0]
    fp32_base = load_model(cfg["base"]).eval()(idx)[0]
    nf4_base = dequantize(load_model(cfg["base"], quantize="nf4")).eval()(idx)[0]
    merged = dequantize(merge_and_unload(model)).eval()
    merged_logits = merged(idx)[0]
    requantized = quantize(merged, "nf4")(idx)[0]
    diff = lambda a, b: dict(max=(a - b).abs().max().item(), mean=(a - b).abs().mean().item())  # noqa: E731
    logits = {"merged (full precision) vs unmerged": diff(merged_logits, unmerged),
              "merged then re-quantized to nf4 vs unmerged": diff(requantized, unmerged),
              "for scale: nf4 base vs fp32 base (no LoRA)": diff(nf4_base, fp32_base)}
    storage = storage_rows(load_model(cfg["base"]), cfg["base"])
    return losses, logits, storage


# ---- 3. the LoRA step: time (interleaved) and memory (fresh processes) --------------------------------------------
def time_bases(cfg, family):
    """One process, three models; each round runs `settle` untimed steps then one timed step of each base."""
    idx, tgt = batch(cfg, family)
    runs = {}
    for base in BASES:
        model = add_lora(with_base(random_model(cfg, family), base), cfg, family)
        runs[base] = (model, adamw(model, cfg["device"]))

    def phases(base):
        model, opt = runs[base]
        state = {}

        def forward():
            state["loss"] = model(idx, tgt)[1]

        def step():
            opt.step()
            opt.zero_grad(set_to_none=True)
        return [forward, lambda: state.pop("loss").backward(), step]

    per = 3 * (cfg["settle"] + 1)
    cols, noise = timing.time_phases([f for b in BASES for _ in range(cfg["settle"] + 1) for f in phases(b)],
                                     cfg["device"], cfg["warmup"], cfg["iters"])
    steps = {b: [sum(c[r] for c in cols[per * i + per - 3: per * (i + 1)]) for r in range(len(cols[0]))]
             for i, b in enumerate(BASES)}
    return steps, noise


def memory_child(cfg, family, base, folder):
    """In a fresh process: load the base from `folder` (quantizing while loading), then LoRA steps. MiB above the
    RSS this process had before loading: peak while loading, resident after, peak during the steps."""
    import gc
    import lora  # noqa: F401 (imported before the first reading, like everything the measured code needs)
    from training.checkpoint import load_model
    from training.memory import set_cpu_mmap_threshold
    set_cpu_mmap_threshold()  # as train.py's cpu_mmap_threshold=65536: freed tensors (each dequantized W) leave
    start = status_kib("VmRSS")
    model = load_model(folder, quantize="" if base == "fp32" else base)
    gc.collect()
    load_peak, resident = status_kib("VmHWM"), status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS: the next peak is the steps' own
    add_lora(model, cfg, family)
    opt = adamw(model, cfg["device"])
    idx, tgt = batch(cfg, family)
    for _ in range(2):
        model(idx, tgt)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step_peak = status_kib("VmHWM")
    return dict(load_peak=(load_peak - start) / 1024, resident=(resident - start) / 1024,
                step_peak=(step_peak - start) / 1024, peak_mem=step_peak * 1024)


def step_rows(cfg, family, tmp):
    folder = os.path.join(tmp, family)
    random_model(cfg, family).save_pretrained(folder)
    steps, noise = time_bases(cfg, family)
    memory = {b: timing.run_isolated(memory_child, cfg, family, b, folder) if cfg["memory"] else {} for b in BASES}
    shutil.rmtree(folder)
    rows = []
    for b in BASES:
        rows.append(dict(shape=family, base=b, step=timing.summarize(steps[b]),
                         vs_fp32=paired(steps[b], steps["fp32"]), **{k: memory[b].get(k) for k in
                                                                     ("load_peak", "resident", "step_peak")}))
    return rows, noise


# ---- main ---------------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--settle", type=int, default=1, help="untimed steps of a base before its timed one")
    p.add_argument("--base", default="out-shakespeare",
                   help="a trained model (out_dir or Hugging Face folder, GPT-2 or LLaMA) for the quality numbers "
                        "('' = skip)")
    p.add_argument("--data_dir", default="data/shakespeare", help="its val shards")
    p.add_argument("--val_batches", type=int, default=40, help="val batches of 8 x val_T tokens")
    p.add_argument("--val_T", type=int, default=64)
    p.add_argument("--shapes", default="gpt2,llama", help="which step benchmarks: gpt2, llama")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="peak memory per base in fresh processes (Linux)")
    p.add_argument("--name", default="quant")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    command = " ".join(["python", "bench/qlora.py", *argv])
    cfg = common.resolve_args(args)
    if cfg["dtype"] != "fp32":
        raise SystemExit("bench/qlora.py compares fp32 weights with their quantized versions: use --dtype fp32")
    cfg["memory"] = cfg["memory"] and os.path.exists("/proc/self/clear_refs")
    print(f"device {common.device_label(cfg['device'])}, threads {cfg['threads']}; GPT n_layer={cfg['n_layer']} "
          f"n_embd={cfg['n_embd']} B={cfg['B']} T={cfg['T']}; LoRA r={cfg['r']}; iters {cfg['iters']}")
    md, extra = [], {}

    storage = storage_rows(random_model(cfg, "gpt2"), "GPT-2 124M shapes, N(0, 0.02) init")
    storage += storage_rows(random_model(cfg, "llama"), "LLaMA shape (TinyLlama layers), N(0, 0.02) init")
    if cfg["base"]:
        losses, logits, trained_storage = quality(cfg)
        storage += trained_storage
        extra.update(val_loss=losses, logits=logits)
    pct = lambda x: f"{100 * x:.2f}%"  # noqa: E731
    md.append("## Storage and quantization error (quantized Linear layers; the rest stays fp32)\n\n" +
              common.markdown_table(storage, [
                  ("model", "model", None), ("method", "method", None), ("weights", "weights", None),
                  ("bytes/weight", "bytes_per_weight", lambda x: f"{x:.4f}"),
                  ("bits/weight", "bits_per_weight", lambda x: f"{x:.3f}"),
                  ("whole model bytes/param", "model_bytes_per_param", lambda x: f"{x:.3f}"),
                  ("whole model MiB (fp32)", "model_mib", lambda x: f"{x:,.0f}"),
                  ("mean abs err / mean abs W", "rel_error", pct)]))
    nf4 = [r["bytes_per_weight"] for r in storage if r["method"] == "nf4"]
    md.append(f"NF4 bytes per quantized weight: at most {max(nf4):.4f}")
    if cfg["base"]:
        md.append(f"## Val loss of {cfg['base']} ({cfg['val_batches']} batches of 8 x {cfg['val_T']} tokens of "
                  f"{cfg['data_dir']} val)\n\n" + "\n".join(
                      f"- {b}: {v:.4f} ({v - losses['fp32']:+.4f} vs fp32)" for b, v in losses.items()))
        md.append(f"## Logits of LoRA r={cfg['r']} (B ~ N(0, 0.02)) on the NF4 base, one val batch\n\n" + "\n".join(
            f"- {what}: max {d['max']:.2e}, mean {d['mean']:.2e}" for what, d in logits.items()))

    tmp = tempfile.mkdtemp(prefix="bench_quant_")
    try:
        for family in [s.strip() for s in cfg["shapes"].split(",") if s.strip()]:
            rows, noise = step_rows(cfg, family, tmp)
            extra[f"steps_{family}"] = rows
            label = (f"GPT-2 124M shapes, B={cfg['B']} T={cfg['T']}, LoRA on {','.join(cfg['targets'])}"
                     if family == "gpt2" else f"LLaMA shape {LLAMA_SHAPE}, B={cfg['B']} T={cfg['T']}, LoRA on "
                                              f"every projection")
            iq = lambda t: f"{t['median']:.0f} ({t['p25']:.0f}-{t['p75']:.0f})"  # noqa: E731
            mib = lambda x: "-" if x is None else f"{x:,.0f}"  # noqa: E731
            table = common.markdown_table(rows, [
                ("base", "base", None), ("step ms (IQR)", "step", iq), ("paired ratio vs fp32", "vs_fp32",
                                                                         lambda x: f"{x:.3f}"),
                ("load peak MiB", "load_peak", mib), ("resident MiB", "resident", mib),
                ("step peak MiB", "step_peak", mib)])
            nf4_row = next(r for r in rows if r["base"] == "nf4")
            md.append(f"## LoRA step: {label}\n\n{table}\n\nRounds kept {rows[0]['step']['n']}; "
                      f"re-run because the CPU was busy: {common.noise_note(noise)}. NF4-base step / fp32-base "
                      f"step (paired): {nf4_row['vs_fp32']:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n\n".join(md)
    print(text)
    env = common.environment(cfg["device"], cfg["threads"])
    print("wrote", *common.save_results(cfg["out_dir"], cfg["name"], env, cfg, storage, text, extra,
                                        command=command))
    return storage, extra


if __name__ == "__main__":
    main()
