"""What does a LoRA training step cost, against full fine-tuning, as the rank grows?

    python bench/lora_rank_sweep.py                       # per-device defaults (below)
    python bench/lora_rank_sweep.py --ranks 8,32 --modes full,split
    python bench/lora_rank_sweep.py --profile split-r32   # torch.profiler table of one row

Rows: full (every parameter trains), LoRA split (y = xW^T + s(xA^T)B^T) and fused (y = x(W + sBA)^T) for
each rank, DoRA (lora/dora.py) in both modes (--modes split,dora,dora_fused), and merged (the adapter folded
into W: inference forward only). Columns: forward, backward and
optimizer-step times (median, interquartile range), peak memory, trainable parameters, tokens/s, achieved
FLOP/s, MFU on a GPU from bench/timing.py's table, and the step time relative to full.

Why LoRA should be cheaper: a frozen weight needs no weight-gradient GEMM (dW = dy^T x), so per token
it costs 4N FLOPs instead of 6N (training/flops.py), and AdamW updates r(in+out) numbers per layer instead
of in*out. A LoRA step is therefore at best ~2/3 of a full step, plus what the adapter itself adds.

Targets: by default every linear layer inside the blocks (c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj),
since that is where full and LoRA training differ; lm_head is left out because it is tied to the frozen
token embedding. Change with --targets.

Defaults. CUDA: GPT-2 124M, B=16, T=1024, bf16 autocast, torch.compile (train.py's GPT-2 pretraining setting).
CPU: the same GPT-2 124M shapes (so every GEMM has GPT-2's size) with B=2, T=128, fp32, no compile, all
cores; the whole sweep takes a few minutes on 2 cores. Each row runs in its own fresh process, which
gives CPU peak memory as peak RSS (minus an idle child's, shown in the header) and keeps rows independent.
"""
import argparse
import os
import sys


import torch  # noqa: E402

from bench import common, timing  # noqa: E402
from training.optim import configure_adamw

MODES = ("full", "split", "fused", "merged", "dora", "dora_fused")  # dora*: DoRA (lora/dora.py) in split/fused


def build(cfg, row):
    """(model to call, raw model, optimizer or None) for one row."""
    from lora import LoRAConfig, apply_lora, merge_lora
    model = common.make_gpt(cfg)
    if row["mode"] != "full":
        mode = "fused" if row["mode"].endswith("fused") else "split"
        apply_lora(model, LoRAConfig(r=row["r"], alpha=cfg["alpha"], dropout=0.0, targets=cfg["targets"], mode=mode,
                                     use_dora=row["mode"].startswith("dora")))
    optimizer = None
    if row["mode"] == "merged":
        merge_lora(model)
        model.eval()
    else:
        optimizer = configure_adamw(model, weight_decay=0.1, learning_rate=1e-4, betas=(0.9, 0.95),
                                               device_type=cfg["device"].split(":")[0], verbose=False)
    run = torch.compile(model) if cfg["compile"] else model
    return run, model, optimizer


def run_row(cfg, row):
    """Time one row; returns its measurements (runs inside a fresh child process, see timing.run_isolated)."""
    device, dtype = cfg["device"], common.parse_dtype(cfg["dtype"], cfg["device"])
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    run, model, optimizer = build(cfg, row)
    idx, targets = common.random_batch(cfg)
    tokens = cfg["B"] * cfg["T"]
    out = dict(row, trainable=timing.num_trainable(model))
    if optimizer is None:  # merged: inference forward only
        def forward():
            with torch.no_grad(), timing.autocast_ctx(device, dtype):
                run(idx, targets)
        t = timing.time_fn(forward, device, cfg["warmup"], cfg["iters"])
        out.update(fwd=t, noise=t["noise"], step_ms=t["median"], step_min=t["min"],
                   flops_per_token=timing.forward_flops_per_token(model, cfg["T"]))
    else:
        out["adamw_fused"] = bool(optimizer.defaults.get("fused"))  # GPT.configure_optimizers decides
        t = timing.time_train_step(run, optimizer, idx, targets, device, dtype, cfg["warmup"], cfg["iters"])
        out.update(t, step_ms=t["step"]["median"], step_min=t["step"]["min"],
                   flops_per_token=timing.train_flops_per_token(model, cfg["T"]))
    out["tok_s"] = tokens / (out["step_ms"] / 1e3)
    out["flop_s"] = out["flops_per_token"] * out["tok_s"]
    peak = timing.peak_flops(device, dtype)
    out["mfu"] = out["flop_s"] / peak if peak else None
    return out


def profile_row(cfg, row):
    device, dtype = cfg["device"], common.parse_dtype(cfg["dtype"], cfg["device"])
    run, model, optimizer = build(cfg, row)
    idx, targets = common.random_batch(cfg)

    def step():
        with timing.autocast_ctx(device, dtype):
            _, loss = run(idx, targets)
        if optimizer is not None:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for _ in range(cfg["warmup"]):
        step()
    return timing.profile_table(step, device, steps=cfg["iters"])


def rows_for(modes, ranks):
    rows = []
    for mode in modes:
        if mode == "full":
            rows.append(dict(name="full", mode="full", r=None))
        elif mode == "merged":  # the rank does not matter once merged: one row
            rows.append(dict(name="merged", mode="merged", r=ranks[0]))
        else:
            rows += [dict(name=f"{mode}-r{r}", mode=mode, r=r) for r in ranks]
    return rows


def parse_row(name, ranks):
    """'full' | 'merged' | 'split-r32' | 'fused-r8' -> a row dict."""
    mode, _, r = name.partition("-r")
    if mode in ("full", "merged") and not r:
        return dict(name=name, mode=mode, r=ranks[0])
    if mode in ("split", "fused", "dora", "dora_fused") and r.isdigit() and int(r) > 0:
        return dict(name=name, mode=mode, r=int(r))
    raise SystemExit(f"--profile {name}: name a row as full, merged, split-rN, fused-rN, dora-rN or dora_fused-rN")


def iqr(t):
    return "-" if t is None else f"{t['median']:.1f} ({t['p25']:.1f}-{t['p75']:.1f})"


def ratio(x):
    return "-" if x is None else f"{x:.3f}"


def table(rows, cuda):
    full = next((r for r in rows if r["mode"] == "full"), None)
    for r in rows:  # the optimizer step is left out of the second ratio: it depends on the optimizer's kernels
        train = full and r["mode"] != "merged"
        r["vs_full"] = r["step_ms"] / full["step_ms"] if train else None
        r["fb_vs_full"] = ((r["fwd"]["median"] + r["bwd"]["median"]) / (full["fwd"]["median"] + full["bwd"]["median"])
                           if train else None)
    mem = "peak alloc" if cuda else "peak RSS (+idle)"
    columns = [("row", "name", None), ("fwd ms", "fwd", iqr), ("bwd ms", "bwd", iqr),
               ("opt ms", "opt", iqr), ("step ms", "step_ms", lambda x: f"{x:.1f}"),
               ("min step ms", "step_min", lambda x: f"{x:.1f}"),
               ("step / full", "vs_full", ratio), ("fwd+bwd / full", "fb_vs_full", ratio),
               (mem, "mem", None), ("trainable", "trainable", None),
               ("tok/s", "tok_s", lambda x: f"{x:,.0f}"), ("FLOP/s", "flop_s", lambda x: common.si(x, "FLOP/s"))]
    if not cuda:
        columns.append(("re-run (busy CPU)", "noise", common.noise_note))
    if cuda:
        columns.append(("MFU", "mfu", lambda x: "-" if x is None else f"{100 * x:.1f}%"))
    return common.markdown_table(rows, columns)


def chart(rows, path, title=""):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [r["name"] for r in rows]
    bottom = [0.0] * len(rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    for phase in ("fwd", "bwd", "opt"):
        h = [r[phase]["median"] if r.get(phase) else 0.0 for r in rows]
        ax.bar(names, h, bottom=bottom, label=phase)
        bottom = [b + x for b, x in zip(bottom, h)]
    ax.set_ylabel("ms per step (median)")
    ax.set_title(title, fontsize=8)
    ax.legend()
    plt.xticks(rotation=45, ha="right")
    fig.tight_layout()
    from tools.atomic import atomic_path
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--ranks", default="1,8,16,32,64,128")
    p.add_argument("--modes", default="full,split,fused,merged", help=f"any of {','.join(MODES)}")
    p.add_argument("--profile", nargs="?", const="auto", default=None, metavar="ROW",
                   help="print a torch.profiler table for one row (e.g. full, split-r32) instead of the sweep")
    p.add_argument("--inprocess", action="store_true",
                   help="run every row in this process (faster to start; memory is then not per row)")
    p.add_argument("--name", default="lora_rank_sweep", help="results file name: <device>_<name>.{json,md}")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    command = " ".join(["python", "bench/lora_rank_sweep.py", *argv])
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not ranks or min(ranks) < 1:
        raise SystemExit(f"--modes {args.modes} / --ranks {args.ranks}: modes must be among {MODES}, ranks >= 1")
    cfg = common.resolve_args(args)
    rows = rows_for(modes, ranks)
    cuda = cfg["device"].startswith("cuda")
    print(f"device {common.device_label(cfg['device'])}, dtype {cfg['dtype']}, compile {cfg['compile']}, "
          f"threads {cfg['threads']}; GPT n_layer={cfg['n_layer']} n_head={cfg['n_head']} n_embd={cfg['n_embd']} "
          f"vocab={cfg['vocab_size']}, B={cfg['B']} T={cfg['T']}, targets {','.join(cfg['targets'])}, "
          f"warmup {cfg['warmup']}, iters {cfg['iters']}")

    if cfg["profile"]:
        name = cfg["profile"] if cfg["profile"] != "auto" else rows[-1 if len(rows) == 1 else 1]["name"]
        row = parse_row(name, ranks)
        print(f"profile of {name} ({cfg['iters']} steps, sorted by self time)")
        print(profile_row(cfg, row))
        return None

    baseline = 0 if (cuda or cfg["inprocess"]) else timing.idle_baseline_bytes(cfg)
    results = []
    for row in rows:
        res = run_row(cfg, row) if cfg["inprocess"] else timing.run_isolated(run_row, cfg, row)
        if cfg["inprocess"]:
            res["peak_mem"] = timing.peak_memory_bytes(cfg["device"])
        res["mem"] = (common.si(res["peak_mem"], "B") if cuda or cfg["inprocess"] else
                      f"{common.si(res['peak_mem'], 'B')} (+{common.si(res['peak_mem'] - baseline, 'B')})")
        results.append(res)
        print(f"{row['name']:>10}: step {res['step_ms']:.1f} ms, {res['tok_s']:,.0f} tok/s, {res['mem']}", flush=True)
    md = table(results, cuda)
    fused = sorted({r["adamw_fused"] for r in results if "adamw_fused" in r})
    md = (f"Optimizer: AdamW from GPT.configure_optimizers, fused kernel: {fused}. Times: median "
          f"(interquartile range) of >= {cfg['iters']} iterations.\n\n" + md)
    if baseline:
        md = f"Idle child process (torch imported): peak RSS {common.si(baseline, 'B')}\n\n" + md
    print()
    print(md)
    env = common.environment(cfg["device"], cfg["threads"])
    paths = common.save_results(cfg["out_dir"], cfg["name"], env, cfg, results, md, dict(idle_rss=baseline),
                                command=command)
    png = chart(results, os.path.join(cfg["out_dir"], f"{env['device']}_{cfg['name']}.png"),
                common.plot_title(env, common.model_label(cfg)))
    print("wrote", *paths, *([png] if png else []))
    return results


if __name__ == "__main__":
    main()
