"""Two defaults train.py picks per device, measured: torch.compile (compile='auto') and the fused AdamW kernel.

    python bench/train_defaults.py                 # CPU: a few minutes, most of it Inductor compiling
    python bench/train_defaults.py --device cuda

compile: one training step (forward, backward, AdamW) of a model and of its torch.compile'd copy, timed interleaved
(eager step, compiled step in every iteration; the ratio is the median of per-iteration compiled / eager ratios):
    small-full   config/shakespeare_cpu.py's GPT (4 x 128, vocab 50304), B=8, T=64, every weight trained
    gpt2-lora    GPT-2 124M's shapes with 2 of its 12 layers (the same GEMMs per layer), B=2, T=128, LoRA r=16 split
The compile time is the first compiled step's wall time; it is paid again by every run (and on CPU by every
process, unless Inductor's cache in /tmp still has the kernels).
adamw: AdamW's step over GPT-2 124M's parameter shapes, fused=True (one kernel for the whole update) vs the
default foreach path, interleaved the same way.
"""
import argparse
import copy
import statistics
import sys
import time


import torch  # noqa: E402

from bench import common, timing  # noqa: E402
from training.optim import configure_adamw

ROWS = {  # name: (n_layer, n_head, n_embd, B, T, lora_r)
    "small-full": (4, 4, 128, 8, 64, 0),
    "gpt2-lora": (2, 12, 768, 2, 128, 16),
}


def paired_ratio(times):
    """Median over iterations of the second phase's time over the first's."""
    return statistics.median(b / a for a, b in zip(*times))


def compile_row(name, cfg):
    from lora import LoRAConfig, apply_lora
    n_layer, n_head, n_embd, B, T, r = ROWS[name]
    shape = dict(cfg, n_layer=n_layer, n_head=n_head, n_embd=n_embd, B=B, T=T)
    eager = common.make_gpt(shape)
    if r:
        apply_lora(eager, LoRAConfig(r=r, targets=("c_attn", "c_proj", "c_fc")))
    compiled_raw = copy.deepcopy(eager)
    compiled = torch.compile(compiled_raw)
    idx, targets = common.random_batch(shape)
    steps = []
    for model, raw in ((eager, eager), (compiled, compiled_raw)):
        optimizer = configure_adamw(raw, 0.1, 1e-4, (0.9, 0.95), cfg["device"].split(":")[0], verbose=False)

        def step(model=model, optimizer=optimizer):
            _, loss = model(idx, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps.append(step)
    t0 = time.perf_counter()
    steps[1]()  # the first compiled step: tracing and Inductor's code generation
    timing.sync(cfg["device"])
    compile_s = time.perf_counter() - t0
    times, info = timing.time_phases(steps, cfg["device"], cfg["warmup"], cfg["iters"])
    eager_ms, compiled_ms = (statistics.median(t) for t in times)
    return dict(row=name, tokens=B * T, compile_s=compile_s, eager_ms=eager_ms, compiled_ms=compiled_ms,
                ratio=paired_ratio(times), break_even_steps=compile_s * 1e3 / max(eager_ms - compiled_ms, 1e-9)
                if compiled_ms < eager_ms else None, rerun=common.noise_note(info))


def adamw_row(cfg):
    L, _, C = common.PRESETS["gpt2"]
    shapes = [(50304, C), (1024, C)] + L * [(3 * C, C), (3 * C,), (C, C), (C,), (4 * C, C), (4 * C,), (C, 4 * C),
                                             (C,), (C,), (C,), (C,), (C,)] + [(C,), (C,)]
    params = [torch.nn.Parameter(torch.randn(s, device=cfg["device"]) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizers = [torch.optim.AdamW(params, lr=1e-4, foreach=True), torch.optim.AdamW(params, lr=1e-4, fused=True)]
    times, info = timing.time_phases([o.step for o in optimizers], cfg["device"], cfg["warmup"], cfg["iters"])
    foreach_ms, fused_ms = (statistics.median(t) for t in times)
    return dict(row="adamw gpt2-124M", params=sum(p.numel() for p in params), foreach_ms=foreach_ms,
                fused_ms=fused_ms, ratio=paired_ratio(times), rerun=common.noise_note(info))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p, model_args=False)
    p.add_argument("--rows", default="small-full,gpt2-lora,adamw", help="which measurements, comma separated")
    p.add_argument("--name", default="train_defaults")
    args = p.parse_args(argv)
    command = "python bench/train_defaults.py " + " ".join(argv if argv is not None else sys.argv[1:])
    args.vocab_size = 50304
    cfg = common.resolve_args(args)
    if cfg["dtype"] != "fp32":
        raise SystemExit("train_defaults measures fp32 steps (--dtype fp32)")
    rows = [adamw_row(cfg) if n == "adamw" else compile_row(n, cfg) for n in cfg["rows"].split(",")]
    compile_rows = [r for r in rows if "compile_s" in r]
    md = ""
    if compile_rows:
        md += "torch.compile, one training step (ratio: median of per-iteration compiled / eager, timed interleaved):\n\n"
        md += common.markdown_table(compile_rows, [
            ("row", "row", None), ("tokens/step", "tokens", None), ("compile s", "compile_s", lambda x: f"{x:.1f}"),
            ("eager ms", "eager_ms", lambda x: f"{x:.1f}"), ("compiled ms", "compiled_ms", lambda x: f"{x:.1f}"),
            ("compiled / eager", "ratio", lambda x: f"{x:.3f}"),
            ("steps to repay the compile", "break_even_steps", lambda x: "never" if x is None else f"{x:,.0f}"),
            ("iterations re-run (busy CPU)", "rerun", None)])
    adamw = [r for r in rows if "fused_ms" in r]
    if adamw:
        md += "\n\nAdamW step (ratio: median of per-iteration fused / foreach, timed interleaved):\n\n"
        md += common.markdown_table(adamw, [
            ("row", "row", None), ("parameters", "params", None), ("foreach ms", "foreach_ms", lambda x: f"{x:.1f}"),
            ("fused ms", "fused_ms", lambda x: f"{x:.1f}"), ("fused / foreach", "ratio", lambda x: f"{x:.3f}"),
            ("iterations re-run (busy CPU)", "rerun", None)])
    print(md)
    env = common.environment(cfg["device"], cfg["threads"])
    print("wrote", *common.save_results(cfg["out_dir"], cfg["name"], env, cfg, rows, md, command=command))
    return rows


if __name__ == "__main__":
    main()
