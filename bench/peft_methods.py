"""Every fine-tuning method on one small task, side by side: what it trains, what it costs, and whether it overfits.

    make shakespeare                                  # the base: config/shakespeare_cpu.py -> out-shakespeare
    python fineweb.py --source shakespeare-romances   # the task -> data/shakespeare_romances
    python bench/peft_methods.py                      # every row, seed 1337
    python bench/peft_methods.py --seeds 1337,1338,1339   # the spread over seeds
    python bench/peft_methods.py --smoke              # a tiny random base and data: seconds (what the tests run)

The task: the Shakespeare base (trained on the plays without the late romances) keeps training on the first
--train_tokens tokens of Pericles, Cymbeline and The Winter's Tale, validated on The Tempest. The training set is
small on purpose, a few epochs in the token budget: a method that memorises it shows a val loss that turns up.
Every row starts from the same base, sees the same batches (same seed) and gets the same number of steps; each
uses its own usual learning rate (ROWS). A row runs in a fresh process (spawn), so its peak RSS is its own.
Columns: trainable parameters, peak memory above an idle process, median step time, best val loss and its step,
final train loss (mean over the last eval interval) and final val loss, and how far val rose from its best.
A new method is one line in ROWS: (peft_method, its train.py settings, learning rate).
DoRA and QLoRA (LoRA on an NF4 base) are LoRA rows with r=16, beside plain LoRA at the same rank.
"""
import argparse
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

from bench.common import ROOT, cpu_threads, environment, markdown_table, plot_title, save_results  # noqa: E402
from bench.timing import idle_baseline_bytes, run_isolated  # noqa: E402

TARGETS = ("c_attn", "c_proj", "c_fc")  # every Linear of the blocks, as config/finetune_shakespeare_lora.py
PROMPT = dict(num_virtual_tokens=16)
ROWS = {  # name -> (peft_method, train.py settings, learning rate); AdaLoRA prunes from 10% to 80% of the steps;
    # quantize: the frozen base's Linear layers in NF4 first (quant/quantize.py), as train.py's quantize setting
    "full": ("full", {}, 1e-3),
    "lora r=1": ("lora", dict(lora_r=1, lora_alpha=16.0, lora_targets=TARGETS), 3e-3),
    "lora r=4": ("lora", dict(lora_r=4, lora_alpha=16.0, lora_targets=TARGETS), 3e-3),
    "lora r=16": ("lora", dict(lora_r=16, lora_alpha=16.0, lora_targets=TARGETS), 3e-3),
    "lora r=64": ("lora", dict(lora_r=64, lora_alpha=16.0, lora_targets=TARGETS), 3e-3),
    "dora r=16": ("lora", dict(lora_r=16, lora_alpha=16.0, lora_targets=TARGETS, lora_use_dora=True), 3e-3),
    "qlora r=16 (nf4)": ("lora", dict(lora_r=16, lora_alpha=16.0, lora_targets=TARGETS, quantize="nf4"), 3e-3),
    "adalora 12->4": ("adalora", dict(adalora_init_r=12, adalora_target_r=4, lora_alpha=16.0, lora_targets=TARGETS),
                      3e-3),
    "prompt": ("prompt", dict(PROMPT, prompt_init="sample_vocab"), 3e-2),
    "ptuning mlp": ("ptuning", dict(PROMPT, encoder_type="MLP"), 3e-3),
    "prefix": ("prefix", dict(PROMPT, prefix_projection=True), 3e-3),
}


# ---- one run ---------------------------------------------------------------------------------------------------
def load_tokens(data_dir, split, n):
    """The first n tokens of a split's shards (int64 tensor)."""
    import glob
    shards = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.npy")))
    if not shards:
        raise SystemExit(f"{data_dir}: no {split} shards; run python fineweb.py --source shakespeare-romances")
    tokens = np.concatenate([np.load(p, allow_pickle=False) for p in shards])[:n]
    if len(tokens) < n:
        raise SystemExit(f"{data_dir}: {split} has {len(tokens):,} tokens, fewer than the {n:,} asked for")
    return torch.from_numpy(tokens.astype(np.int64))


def make_base(cfg):
    if cfg["smoke"]:
        from model import GPT, GPTConfig
        torch.manual_seed(0)
        return GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32))
    from training.checkpoint import load_model
    return load_model(cfg["base"])


def task_data(cfg):
    if cfg["smoke"]:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 64, (cfg["train_tokens"],), generator=g), torch.randint(0, 64, (4096,), generator=g)
    val_tokens = cfg["eval_batches"] * cfg["B"] * cfg["T"] + 1
    return load_tokens(cfg["data"], "train", cfg["train_tokens"]), load_tokens(cfg["data"], "val", val_tokens)


def batch(tokens, B, T, generator):
    """B windows of T + 1 tokens at random offsets: x, y (B, T)."""
    starts = torch.randint(0, len(tokens) - T - 1, (B,), generator=generator)
    rows = torch.stack([tokens[s:s + T + 1] for s in starts.tolist()])  # (B, T + 1)
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def val_loss(model, val, B, T, n_batches):
    model.eval()
    losses = []
    for i in range(n_batches):
        rows = val[i * B * T:(i + 1) * B * T + 1]
        losses.append(model(rows[:-1].view(B, T), rows[1:].view(B, T))[1].item())
    model.train()
    return sum(losses) / len(losses)


def run(cfg, row, seed):
    """Train one row for cfg['steps'] steps; its curves, step times and trainable parameter count."""
    import adapters
    from lora.summary import count_parameters
    method, settings, lr = ROWS[row]
    settings = dict(settings)
    quantize = settings.pop("quantize", "")
    train, val = task_data(cfg)
    model = make_base(cfg)
    if quantize:
        from quant import quantize as quantize_model
        quantize_model(model, quantize)
    torch.manual_seed(seed)  # the adapter's init
    steps = cfg["steps"]
    schedule = dict(max_steps=steps, adalora_tinit=steps // 10, adalora_tfinal=steps // 5)
    adapters.apply(model, method, {**schedule, **settings})
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    hooks = adapters.method(method).training_hooks(model)  # AdaLoRA's, as train.py runs them
    gen = torch.Generator().manual_seed(seed)  # the batches: the same for every row
    B, T, every = cfg["B"], cfg["T"], cfg["eval_every"]
    curve, step_ms = {"step": [], "train": [], "val_step": [], "val": []}, []
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            curve["val_step"].append(step)
            curve["val"].append(val_loss(model, val, B, T, cfg["eval_batches"]))
        if step == steps:
            break
        x, y = batch(train, B, T, gen)
        for group in optimizer.param_groups:  # 10% linear warmup, then cosine to 10%
            warm = max(1, steps // 10)
            group["lr"] = lr * ((step + 1) / warm if step < warm else
                                0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))
        t0 = time.perf_counter()
        _, loss = model(x, y)
        objective = loss if hooks is None else loss + hooks.loss(model)  # AdaLoRA's orthogonality term
        optimizer.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if hooks is not None:
            hooks.after_step(model, step)
        step_ms.append(1000 * (time.perf_counter() - t0))
        curve["step"].append(step)
        curve["train"].append(loss.item())
    return {"row": row, "seed": seed, "trainable": count_parameters(model)[0], "step_ms": statistics.median(step_ms),
            "curve": curve}


# ---- the table --------------------------------------------------------------------------------------------------
def summarize(result, every):
    c = result["curve"]
    best = min(range(len(c["val"])), key=lambda i: c["val"][i])
    return dict(best_val=c["val"][best], best_step=c["val_step"][best], final_val=c["val"][-1],
                final_train=statistics.mean(c["train"][-every:]), val_rise=c["val"][-1] - c["val"][best])


def mean_sd(values, digits=3):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table_rows(results, cfg):
    rows = []
    for name in cfg["rows"]:
        runs = [r for r in results if r["row"] == name]
        s = [summarize(r, cfg["eval_every"]) for r in runs]
        rows.append({"method": name, "lr": ROWS[name][2], "trainable": runs[0]["trainable"],
                     "peak_mb": (statistics.median(r["peak_mem"] for r in runs) / 2**20 if "peak_mem" in runs[0]
                                 else None),
                     "step_ms": statistics.median(r["step_ms"] for r in runs),
                     "best_val": mean_sd([x["best_val"] for x in s]),
                     "best_step": ", ".join(str(x["best_step"]) for x in s),
                     "final_train": mean_sd([x["final_train"] for x in s]),
                     "final_val": mean_sd([x["final_val"] for x in s]),
                     "val_rise": mean_sd([x["val_rise"] for x in s])})
    return rows


COLUMNS = [("method", "method", None), ("lr", "lr", lambda x: f"{x:g}"), ("trainable params", "trainable", None),
           ("peak RSS above idle (MB)", "peak_mb", lambda x: "-" if x is None else f"{x:.0f}"),
           ("step ms (median)", "step_ms", lambda x: f"{x:.0f}"), ("best val loss", "best_val", str),
           ("best at step", "best_step", str), ("final train loss", "final_train", str),
           ("final val loss", "final_val", str), ("val rise from best", "val_rise", str)]


def plot(results, cfg, path, title=""):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = len(cfg["rows"])
    cols = min(3, n)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(4.2 * cols, 3.2 * math.ceil(n / cols)), sharey=True,
                             squeeze=False)
    for ax, name in zip(axes.flat, cfg["rows"]):
        for r in (r for r in results if r["row"] == name):
            c = r["curve"]
            ax.plot(c["step"], c["train"], color="tab:blue", alpha=0.35, lw=0.8)
            ax.plot(c["val_step"], c["val"], color="tab:red", marker=".", lw=1.2)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0][0].set_ylabel("loss (blue: train, red: val)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=os.path.join(ROOT, "out-shakespeare"), help="our out_dir or a HF folder")
    p.add_argument("--data", default=os.path.join(ROOT, "data", "shakespeare_romances"))
    p.add_argument("--train_tokens", type=int, default=4096, help="the small training set: its first N tokens")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=48, help="tokens per row (+ 16 virtual ones fit the base's 64)")
    p.add_argument("--eval_every", type=int, default=5)
    p.add_argument("--eval_batches", type=int, default=4)
    p.add_argument("--seeds", default="1337")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated names of ROWS")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny random base and data, a few steps, in this process")
    p.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args(argv)
    if args.smoke:
        args.train_tokens, args.steps, args.B, args.T, args.eval_every, args.eval_batches = 512, 6, 2, 8, 2, 2
    cfg = dict(vars(args), device="cpu", threads=cpu_threads(args.threads),
               seeds=[int(s) for s in args.seeds.split(",")], rows=[r.strip() for r in args.rows.split(",")])
    unknown = [r for r in cfg["rows"] if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows {unknown}: not in ROWS ({', '.join(ROWS)})")
    if not args.smoke and not os.path.exists(args.base):
        raise SystemExit(f"--base {args.base} does not exist: make shakespeare (config/shakespeare_cpu.py) first")
    idle = 0 if args.smoke else idle_baseline_bytes(cfg)
    name = "peft_methods_smoke" if args.smoke else "peft_methods"
    command = "python bench/peft_methods.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = []
    for seed in cfg["seeds"]:
        for row in cfg["rows"]:  # rows interleaved within each seed
            result = run(cfg, row, seed) if args.smoke else run_isolated(run, cfg, row, seed)
            if not args.smoke:
                result["peak_mem"] -= idle
            results.append(result)
            s = summarize(result, cfg["eval_every"])
            print(f"seed {seed} {row:>14}: best val {s['best_val']:.3f} @ {s['best_step']}, final train "
                  f"{s['final_train']:.3f}, val {s['final_val']:.3f}, {result['step_ms']:.0f} ms/step", flush=True)
            done = {**cfg, "rows": [r for r in cfg["rows"] if any(x["row"] == r for x in results)]}
            rows, paths, png = write(results, done, name, command)  # after every run: a cut-short run keeps its rows
    print(markdown_table(rows, COLUMNS))
    return rows, paths, png


def write(results, cfg, name, command):
    rows = table_rows(results, cfg)
    env = environment("cpu", cfg["threads"])
    paths = save_results(cfg["out_dir"], name, env, {k: v for k, v in cfg.items() if k != "device"}, rows,
                         markdown_table(rows, COLUMNS), extra={"runs": results}, command=command)
    model = "tiny random base (--smoke)" if cfg["smoke"] else os.path.basename(os.path.normpath(cfg["base"]))
    return rows, paths, plot(results, cfg, os.path.join(cfg["out_dir"], f"{env['device']}_{name}.png"),
                             plot_title(env, model))


if __name__ == "__main__":
    main()
