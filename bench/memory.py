"""Peak memory of a training step, measured against training/memory.py's prediction, as T and B grow.

    python bench/memory.py                                   # GPT-2 124M, B x T sweep, full / LoRA / LoRA + ckpt
    python bench/memory.py --shapes 4x1024 --modes lora,lora-plain --compare

Rows (each in its own fresh process, so that the peak is the row's own):
  full        every parameter trains; chunked linear + cross-entropy (the default loss)
  lora        LoRA r=16 on c_attn, c_proj, c_fc; chunked loss (its gradients formed in forward, the default)
  lora-ckpt   LoRA + activation checkpointing (each block recomputed in backward)
  lora-recompute  LoRA; chunked loss recomputing its logits in backward (loss_recompute = True)
  lora-plain  LoRA with loss_chunk_size = 0: full logits then F.cross_entropy, the loss before the chunked one
  full-plain  full fine-tuning with the plain loss
Measured: CUDA max_memory_allocated; CPU peak RSS of the row's process minus an idle child's (torch imported). On CPU
the rows run with glibc's own (moving) mmap threshold, as train.py does by default (cpu_mmap_threshold = 0);
--mmap_threshold N fixes it at N bytes first, as train.py's cpu_mmap_threshold=N does, so that every freed tensor of
N bytes or more leaves the process (training/memory.py): the peak is then the live tensors' and the step pays for
fresh pages.
--compare times settings on one model in one process, interleaved step by step (one step of each per iteration), and
reports the medians of the per-iteration ratios to the first: lora-plain, lora, lora-recompute and lora-ckpt with
glibc's threshold at its 32 MiB ceiling (where its moving threshold ends up once a step has freed its large tensors:
the default allocator in a running job), then lora with the threshold fixed at 64 KiB (the memory-saving choice).
"""
import argparse
import os
import statistics
import sys


import torch  # noqa: E402

from bench import common, timing  # noqa: E402
from training.memory import CPU_MMAP_THRESHOLD, GLIBC_MMAP_CEILING, set_cpu_mmap_threshold  # noqa: E402
from training.optim import configure_adamw

MODES = {  # name: (LoRA?, activation checkpointing?, loss: "chunked" | "recompute" | "plain")
    "full": (False, False, "chunked"), "lora": (True, False, "chunked"), "lora-ckpt": (True, True, "chunked"),
    "lora-recompute": (True, False, "recompute"), "lora-plain": (True, False, "plain"),
    "full-plain": (False, False, "plain")}


def build(cfg, mode, B, T):
    """(model, optimizer, batch) for one row: GPT of cfg's shape, LoRA or not, with the mode's memory settings."""
    from lora import LoRAConfig, apply_lora
    lora = MODES[mode][0]
    model = common.make_gpt(dict(cfg, T=T))
    if lora:
        apply_lora(model, LoRAConfig(r=cfg["r"], alpha=cfg["alpha"], targets=cfg["targets"]))
    set_mode(model, mode, cfg)
    optimizer = configure_adamw(model, weight_decay=0.1, learning_rate=1e-4, betas=(0.9, 0.95),
                                           device_type=cfg["device"].split(":")[0], verbose=False)
    return model, optimizer, common.random_batch(dict(cfg, B=B, T=T))


def set_mode(model, mode, cfg):
    _, ckpt, loss = MODES[mode]
    model.activation_checkpointing, model.loss_chunk_size = ckpt, 0 if loss == "plain" else cfg["chunk"]
    model.loss_recompute = loss == "recompute"


def act_bytes(cfg):
    return 4 if cfg["dtype"] == "fp32" else 2


def set_allocator(cfg, threshold):
    if not cfg["device"].startswith("cuda") and threshold:
        set_cpu_mmap_threshold(threshold)


def run_row(cfg, row):
    """One row in a fresh process: predicted peak, then warmup + timed steps; the parent adds the measured peak."""
    from training.memory import estimate_peak_bytes
    set_allocator(cfg, cfg["mmap_threshold"])
    timing.NOISE_LIMIT = cfg["noise_limit"]
    device, dtype = cfg["device"], common.parse_dtype(cfg["dtype"], cfg["device"])
    model, optimizer, (idx, targets) = build(cfg, row["mode"], row["B"], row["T"])
    estimate = estimate_peak_bytes(model, row["B"], row["T"], act_bytes=act_bytes(cfg), device=device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)  # the weights stay: they are part of the prediction
    t = timing.time_train_step(model, optimizer, idx, targets, device, dtype, cfg["warmup"], cfg["iters"])
    return dict(row, predicted=estimate.peak, estimate=vars(estimate), step_ms=t["step"]["median"], time=t,
                noise=t["noise"])


def compare(cfg, B, T, settings):
    """Interleaved step times of `settings` [(name, mode, mmap threshold)] on one LoRA model: {"summaries": {name:
    summary}, "ratios": {name: median ratio to the first}}. Runs in a child process: on Linux a child's peak RSS
    starts at its parent's (fork, then exec, keeps the high-water mark), so the parent must stay small for the rows
    measured after it."""
    device, dtype = cfg["device"], common.parse_dtype(cfg["dtype"], cfg["device"])
    model, optimizer, (idx, targets) = build(cfg, settings[0][1], B, T)

    def step_of(mode, threshold):
        def step():
            set_allocator(cfg, threshold)
            set_mode(model, mode, cfg)
            with timing.autocast_ctx(device, dtype):
                _, loss = model(idx, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step
    timing.NOISE_LIMIT = cfg["noise_limit"]
    cols, info = timing.time_phases([step_of(m, t) for _, m, t in settings], device, cfg["warmup"], cfg["iters"])
    names = [name for name, _, _ in settings]
    summaries = {n: dict(timing.summarize(ms), noise=info) for n, ms in zip(names, cols)}
    ratios = {n: statistics.median(a / b for a, b in zip(ms, cols[0])) for n, ms in zip(names, cols)}
    return dict(summaries=summaries, ratios=ratios)


def chart(rows, path, title=""):
    if len({r["T"] for r in rows}) < 2:
        return None  # memory vs T needs more than one T
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    B = max({r["B"] for r in rows}, key=lambda b: sum(r["B"] == b for r in rows))  # the B with the most T's
    for i, mode in enumerate(dict.fromkeys(r["mode"] for r in rows)):
        pts = sorted((r["T"], r["measured"], r["predicted"]) for r in rows if r["mode"] == mode and r["B"] == B)
        color = f"C{i}"
        ax.plot([p[0] for p in pts], [p[1] / 1e9 for p in pts], "o-", color=color, label=f"{mode} measured")
        ax.plot([p[0] for p in pts], [p[2] / 1e9 for p in pts], "x--", color=color, label=f"{mode} predicted")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(f"sequence length T (B={B})")
    ax.set_ylabel("peak memory of a training step, GB")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from tools.atomic import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def table(rows, cuda, idle):
    gb = lambda b: f"{b / 1e9:.3f}"  # noqa: E731
    columns = [("row", "name", None), ("B", "B", None), ("T", "T", None),
               ("measured GB" + (" (max allocated)" if cuda else " (peak RSS - idle)"), "measured", gb),
               ("predicted GB", "predicted", gb), ("predicted / measured - 1", "error", lambda e: f"{100 * e:+.1f}%"),
               ("step ms (median)", "step_ms", lambda x: f"{x:,.0f}")]
    if not cuda:
        columns.append(("re-run (busy CPU)", "noise", common.noise_note))
    md = common.markdown_table(rows, columns)
    return f"Idle child process (torch imported): peak RSS {common.si(idle, 'B')}\n\n" + md if idle else md


def parse_shapes(text):
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise SystemExit(f"--shapes {text!r}: give BxT pairs, e.g. 4x128,4x1024")
    return shapes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--shapes", default="4x128,4x256,4x512,4x1024,4x2048,1x1024,2x1024", help="BxT, comma separated")
    p.add_argument("--modes", default="full,lora,lora-ckpt", help=f"any of {','.join(MODES)}")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--chunk", type=int, default=1024, help="loss_chunk_size of the chunked loss")
    p.add_argument("--compare", action="store_true",
                   help="first time lora-plain, lora, lora-recompute, lora-ckpt interleaved in one process at the "
                        "largest shape")
    p.add_argument("--mmap_threshold", type=int, default=0,
                   help="CPU: fix glibc's mmap threshold at N bytes for every row, as train.py's "
                        "--cpu_mmap_threshold=N (default 0: glibc's own moving threshold, train.py's default)")
    p.add_argument("--compare_iters", type=int, default=3, help="timed iterations of --compare")
    p.add_argument("--noise_limit", type=float, default=timing.NOISE_LIMIT,
                   help="CPU: re-run iterations during which other processes used more than this share of the "
                        "machine (timing.py); 1 keeps every iteration (a busy shared machine), the load is recorded")
    p.add_argument("--name", default="memory", help="results file name: <device>_<name>.{json,md}")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    command = " ".join(["python", "bench/memory.py", *argv])
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        raise SystemExit(f"--modes {args.modes}: choose among {','.join(MODES)}")
    if not 0 <= args.mmap_threshold <= GLIBC_MMAP_CEILING:
        raise SystemExit(f"--mmap_threshold {args.mmap_threshold}: give 0 ... {GLIBC_MMAP_CEILING} bytes")
    if args.r < 1 or args.chunk < 1:
        raise SystemExit(f"--r {args.r} / --chunk {args.chunk}: both must be >= 1")
    shapes = parse_shapes(args.shapes)
    cfg = common.resolve_args(args)
    timing.NOISE_LIMIT = cfg["noise_limit"]
    cuda = cfg["device"].startswith("cuda")
    print(f"device {common.device_label(cfg['device'])}, dtype {cfg['dtype']}, threads {cfg['threads']}; GPT "
          f"n_layer={cfg['n_layer']} n_embd={cfg['n_embd']} vocab={cfg['vocab_size']}; LoRA r={cfg['r']} on "
          f"{','.join(cfg['targets'])}; loss chunk {cfg['chunk']}; warmup {cfg['warmup']}, iters {cfg['iters']}")

    extra, compare_md = {}, ""
    if cfg["compare"]:  # first: the number the loss is judged by, on a model of its own in this process
        B, T = max(shapes, key=lambda s: s[0] * s[1])
        ceiling, fixed = GLIBC_MMAP_CEILING, CPU_MMAP_THRESHOLD
        settings = [(f"{m}, glibc threshold 32 MiB", m, ceiling) for m in ("lora-plain", "lora", "lora-recompute",
                                                                           "lora-ckpt")]
        settings += [(f"lora, threshold fixed at {fixed // 1024} KiB", "lora", fixed)]
        result = timing.run_isolated(compare, dict(cfg, iters=cfg["compare_iters"]), B, T, settings)
        summaries, ratios = result["summaries"], result["ratios"]
        extra["compare"] = dict(B=B, T=T, summaries=summaries, ratios=ratios)
        lines = [f"| {m} | {s['median']:,.0f} ({s['p25']:,.0f}-{s['p75']:,.0f}) | {ratios[m]:.3f} |"
                 for m, s in summaries.items()]
        compare_md = (f"\n\nStep time, LoRA r={cfg['r']}, B={B}, T={T}: the settings interleaved step by step on one "
                      f"model (median of {summaries[settings[0][0]]['n']} steps each):\n\n"
                      "| setting | step ms (median, IQR) | median ratio to the first |\n|---|---|---|\n"
                      + "\n".join(lines))
        print("\n".join(lines), flush=True)
    idle = 0 if cuda else timing.idle_baseline_bytes(cfg)
    extra["idle_rss"] = idle
    env, rows = common.environment(cfg["device"], cfg["threads"]), []
    for B, T in shapes:
        for mode in modes:
            res = timing.run_isolated(run_row, cfg, dict(name=f"{mode} {B}x{T}", mode=mode, B=B, T=T))
            res["measured"] = res["peak_mem"] - idle
            res["error"] = res["predicted"] / res["measured"] - 1
            rows.append(res)
            print(f"{res['name']:>20}: measured {common.si(res['measured'], 'B')}, predicted "
                  f"{common.si(res['predicted'], 'B')} ({100 * res['error']:+.1f}%), step {res['step_ms']:.0f} ms",
                  flush=True)
            md = table(rows, cuda, idle) + compare_md
            env = common.environment(cfg["device"], cfg["threads"])  # written after every row: a long sweep
            paths = common.save_results(cfg["out_dir"], cfg["name"], env, cfg, rows, md, extra, command=command)
    print()
    print(md)
    png = chart(rows, os.path.join(cfg["out_dir"], f"{env['device']}_{cfg['name']}.png"),
                common.plot_title(env, common.model_label(cfg)))
    print("wrote", *paths, *([png] if png else []))
    return rows


if __name__ == "__main__":
    main()
