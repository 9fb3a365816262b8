"""Does rank 1 suffice for GRPO? LoRA r=1 vs r=16 vs full fine-tuning on `make grpo`'s task, over seeds.

    make grpo                                   # the base, the task and one run (data/arithmetic/grpo)
    python bench/grpo_rank.py                   # 3 rows x 3 seeds x 20 steps: 9 make-grpo runs (45-90 min, 2 cores)
    python bench/grpo_rank.py --quick           # 1 seed, 5 steps, 8 val prompts: is it wired up (~10 min, 2 cores)
    python bench/grpo_rank.py --smoke           # a tiny random base and task: seconds (what the tests run)

RL from a verifiable reward carries little information per sample (about one bit per completion), so a tiny
adapter may hold all a run can learn: LoRA without regret (Schulman et al., 2025) reports rank 1 matching full
fine-tuning for RL. Each row is train.py with config/grpo_smollm2.py (8 completions of 2 prompts a step, the
adapter switched off as the KL's reference; full fine-tuning keeps a frozen copy), its own learning rate (ROWS),
the same seeds: the same prompts and, at step 0, the same samples. Both ranks keep alpha = 32, so the scale alpha / r
is 32 at r=1 and 2 at r=16: with B = 0 at the start, a first step then moves W by the same amount at either rank and
one learning rate serves both (the 1/r parametrisation "LoRA without regret" uses; alpha = 2r, scale 2 at both,
left r=1 nearly still in a 5-step trial: KL 0.001). Columns, mean over seeds (min-max): the held-out greedy accuracy before and after, the sampled reward
over the last 5 steps, the KL at the end, trainable parameters and the median step time. The PNG: the sampled
reward per step (a 5-step moving mean; seeds' mean and min-max band) and the accuracy after. Each run is a fresh
`python train.py` process; CPU step times are those of a shared machine (the load average is in the header).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import ROOT, cpu_threads, environment, markdown_table, plot_title, save_results

CONFIG = os.path.join(ROOT, "config", "grpo_smollm2.py")
ROWS = {  # name -> (peft_method, train.py settings, learning rate)
    "lora r=1": ("lora", dict(lora_r=1, lora_alpha=32.0), 5e-4),
    "lora r=16": ("lora", dict(lora_r=16, lora_alpha=32.0), 5e-4),
    "full": ("full", {}, 1e-5),
}
COLUMNS = [("row", "row", str), ("trainable params", "params", lambda x: f"{x:,}"),
           ("accuracy before", "before", str), ("accuracy after", "after", str),
           ("sampled reward, last 5 steps", "last_reward", str), ("kl at the end", "kl", str),
           ("step s (median)", "step_s", lambda x: f"{x:.1f}"), ("seeds", "seeds", str)]


def flags_of(cfg, row, seed, out_dir):
    method, settings, lr = ROWS[row]
    flags = dict(peft_method=method, seed=seed, out_dir=out_dir, max_steps=cfg["steps"], eval_interval=cfg["steps"],
                 eval_iters=cfg["eval_iters"], max_lr=lr, min_lr=lr / 10, checkpoint_interval=0, overwrite=True,
                 **settings, **cfg["extra"])
    if method != "lora":
        flags = {k: v for k, v in flags.items() if not k.startswith("lora_")}
    return [f"--{k}={v}" for k, v in flags.items()]


def run(cfg, row, seed, work):
    """One train.py run: its log, trainable parameters and wall time."""
    out_dir = os.path.join(work, f"{row.replace(' ', '_').replace('=', '')}-{seed}")
    cmd = [sys.executable, "train.py", cfg["config"], *flags_of(cfg, row, seed, out_dir)]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]))
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{row} seed {seed} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    params = sum(int(n.replace(",", "")) for n in re.findall(r"tensors: \d+, with ([\d,]+) parameters", result.stdout))
    return dict(row=row, seed=seed, params=params, log=log)


def spread(values, digits=3):
    """'mean (min-max)' of a row's seeds."""
    mean = statistics.fmean(values)
    text = f"{mean:.{digits}f}"
    return text if len(values) == 1 else f"{text} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table_rows(results, cfg):
    rows = []
    for name in cfg["rows"]:
        runs = [r for r in results if r["row"] == name]
        if not runs:
            continue
        evals = [[x["eval_reward"] for x in r["log"] if "eval_reward" in x] for r in runs]
        rows.append(dict(row=name, params=runs[0]["params"], before=spread([e[0] for e in evals]),
                         after=spread([e[-1] for e in evals]),
                         last_reward=spread([statistics.fmean(x["reward"] for x in r["log"][-5:]) for r in runs]),
                         kl=spread([r["log"][-1].get("kl", 0.0) for r in runs]),
                         step_s=statistics.median(x["dt_ms"] / 1000 for r in runs for x in r["log"]),
                         seeds=",".join(str(r["seed"]) for r in runs)))
    return rows


def moving_mean(values, k=5):
    return [statistics.fmean(values[max(0, i - k + 1):i + 1]) for i in range(len(values))]


def plot(results, cfg, path, title=""):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, color in zip(cfg["rows"], ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        runs = [r for r in results if r["row"] == name]
        if not runs:
            continue
        curves = [moving_mean([x["reward"] for x in r["log"]]) for r in runs]
        steps = [x["step"] for x in runs[0]["log"]]
        mean = [statistics.fmean(c[i] for c in curves) for i in range(len(steps))]
        ax.plot(steps, mean, color=color, label=f"{name} (sampled reward)")
        ax.fill_between(steps, [min(c[i] for c in curves) for i in range(len(steps))],
                        [max(c[i] for c in curves) for i in range(len(steps))], color=color, alpha=0.15)
        after = [[x["eval_reward"] for x in r["log"] if "eval_reward" in x][-1] for r in runs]
        ax.scatter([steps[-1]] * len(after), after, color=color, marker="*", s=60, zorder=3)
    before = [[x["eval_reward"] for x in r["log"] if "eval_reward" in x][0] for r in results]
    ax.axhline(statistics.fmean(before), color="gray", ls="--", lw=1, label="greedy accuracy at step 0")
    ax.set_xlabel("step")
    ax.set_ylabel("reward (5-step mean); * greedy held-out accuracy after")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def smoke_world(work):
    """A tiny random GPT base and a prompt folder whose answer is one character: for --smoke (the tests)."""
    import numpy as np
    import torch
    from model import GPT
    from prepare_sft import HEADER, write_split
    torch.manual_seed(0)
    GPT(GPT.scratch_config(dict(block_size=16, vocab_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                                bias=True))).save_pretrained(os.path.join(work, "base"))
    rng, data = np.random.default_rng(0), os.path.join(work, "data")
    os.makedirs(data)
    for split, n in (("train", 16), ("val", 4)):
        prompts = [rng.integers(1, 16, 3).tolist() for _ in range(n)]
        write_split(Path(data), split, [
            (p, [0] * 3, json.dumps({"answer": "0" if p[-1] <= 7 else "/", "where": f"smoke:{i}"}))
            for i, p in enumerate(prompts)], np.uint16, 10_000)
    with open(os.path.join(data, HEADER), "w") as f:
        json.dump({"kind": "prompt", "tokenizer": "gpt2", "eos_id": 0, "pad_id": 0, "vocab_size": 16}, f)
    return dict(init_from=os.path.join(work, "base"), data_dir=data, block_size=8, batch_size=2,
                total_batch_size=16, grpo_num_generations=4, grpo_max_new_tokens=1, grpo_reward="exact",
                lora_targets="c_attn,c_fc", warmup_steps=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=CONFIG, help="the train.py config of a run (make grpo's)")
    p.add_argument("--steps", type=int, default=20, help="steps a run (make grpo's 20)")
    p.add_argument("--eval_iters", type=int, default=0, help="val batches (of batch_size prompts) per evaluation (0 = all)")
    p.add_argument("--seeds", default="1337,1338,1339")
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated names of ROWS")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="1 seed, 5 steps, 8 val prompts")
    p.add_argument("--smoke", action="store_true", help="a tiny random base and task, 3 steps")
    p.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args(argv)
    if args.quick or args.smoke:
        args.seeds, args.steps, args.eval_iters = args.seeds.split(",")[0], (3 if args.smoke else 5), 4
    cfg = dict(vars(args), threads=cpu_threads(args.threads), seeds=[int(s) for s in args.seeds.split(",")],
               rows=[r.strip() for r in args.rows.split(",")], extra={})
    unknown = [r for r in cfg["rows"] if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows {unknown}: not in ROWS ({', '.join(ROWS)})")
    name = "grpo_rank" + ("_smoke" if args.smoke else "_quick" if args.quick else "")
    command = "python bench/grpo_rank.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = []
    with tempfile.TemporaryDirectory(prefix="grpo_rank_") as work:
        if args.smoke:
            cfg["extra"] = smoke_world(work)
        for seed in cfg["seeds"]:
            for row in cfg["rows"]:
                results.append(run(cfg, row, seed, work))
                log = results[-1]["log"]
                evals = [x["eval_reward"] for x in log if "eval_reward" in x]
                print(f"seed {seed} {row:>10}: accuracy {evals[0]:.3f} -> {evals[-1]:.3f}, sampled reward "
                      f"{log[0]['reward']:.3f} -> {log[-1]['reward']:.3f}", flush=True)
                rows, paths, png = write(results, cfg, name, command)  # after every run: a cut-short run keeps its rows
    print(markdown_table(rows, COLUMNS))
    return rows, paths, png


def write(results, cfg, name, command):
    rows = table_rows(results, cfg)
    env = environment("cpu", cfg["threads"])
    paths = save_results(cfg["out_dir"], name, env, {k: v for k, v in cfg.items() if k != "extra"}, rows,
                         markdown_table(rows, COLUMNS), extra={"runs": results}, command=command)
    model = "tiny random base (--smoke)" if cfg["smoke"] else "SmolLM2-135M-Instruct"
    return rows, paths, plot(results, cfg, os.path.join(cfg["out_dir"], f"{env['device']}_{name}.png"),
                             plot_title(env, model))


if __name__ == "__main__":
    main()
