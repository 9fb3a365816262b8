"""Whole runs as a user meets them: train.py against a transformers + PEFT loop doing the same step, each in its own
process, the processes interleaved.

    python -m bench.train_vs_peft                     # SmolLM2-135M-Instruct, LoRA r=16 on all seven projections
    python -m bench.train_vs_peft --rounds 5 --steps 8

bench/vs_peft.py times the model's step inside one process; this times what `python train.py ...` does around it
too (the data loader, gradient clipping, the learning-rate schedule, logging, the allocator settings). Each round
starts one process per row, in order, and reads the step times it logged (train.py: log.jsonl's dt_ms; the PEFT
loop prints them), keeping steps 2 .. steps-1 (step 0 warms up; step 1 is AdamW's first update, which allocates
its moments). A row's time in a round is the median of those; a ratio is the median over rounds of the paired
per-round ratios, so a drift in the machine's speed hits both sides of a ratio alike. Rows:
    ours-lora          train.py, LoRA, every setting at its default (the chunked loss with its gradients formed
                       in forward, glibc's own mmap threshold)
    ours-lora-plain    the same with loss_chunk_size=0: full logits and F.cross_entropy, the loss path of the
                       transformers side (like with like)
    ours-lora-mmap64k  the same as ours-lora with cpu_mmap_threshold=65536 (freed tensors leave the process)
    ours-full          train.py, full fine-tuning, defaults
    peft-lora          AutoModelForCausalLM + peft.get_peft_model (the same r, alpha, targets, dropout 0), its
                       defaults otherwise (sdpa attention, transformers' loss on full logits), torch AdamW with
                       the same hyperparameters, gradient clipping at 1.0 as train.py
Both sides read the same batches (the first rows of the train shard), fp32, the same thread count.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common

ROOT = Path(__file__).resolve().parent.parent  # the processes run here: train.py and the bench package

ROWS = ("ours-lora", "ours-lora-plain", "ours-lora-mmap64k", "ours-full", "peft-lora")
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
RATIOS = (("ours-lora", "peft-lora"), ("ours-lora-plain", "peft-lora"), ("ours-lora", "ours-full"),
          ("ours-lora-mmap64k", "ours-lora"), ("ours-lora", "ours-lora-plain"))


def train_py_command(args, row, out_dir):
    """The train.py command line of one of our rows."""
    flags = [f"--init_from={args.model}", f"--data_dir={args.data_dir}", "--device=cpu", "--dtype=float32",
             "--compile=False", f"--batch_size={args.B}", f"--block_size={args.T}",
             f"--total_batch_size={args.B * args.T}", f"--max_steps={args.steps}", "--warmup_steps=0",
             "--max_lr=1e-4", "--min_lr=1e-4", "--weight_decay=0.0", "--eval_interval=0", "--sample_interval=0",
             "--checkpoint_interval=0", "--log_interval=1", f"--out_dir={out_dir}"]
    if row == "ours-full":
        flags.append("--peft_method=full")
    else:
        flags += ["--peft_method=lora", f"--lora_r={args.r}", f"--lora_alpha={2.0 * args.r}", "--lora_dropout=0.0",
                  f"--lora_targets={TARGETS}"]
    if row == "ours-lora-plain":
        flags.append("--loss_chunk_size=0")
    if row == "ours-lora-mmap64k":
        flags.append("--cpu_mmap_threshold=65536")
    return [sys.executable, str(ROOT / "train.py"), *flags]


def peft_loop(args):
    """The transformers + PEFT side (runs in its own process): print one `dt_ms <ms>` line per step."""
    import numpy as np
    import peft
    import torch
    import transformers
    from loaders.tokens import load_tokens

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False
    model = peft.get_peft_model(model, peft.LoraConfig(r=args.r, lora_alpha=2.0 * args.r, lora_dropout=0.0,
                                                       target_modules=TARGETS.split(","), bias="none"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    shard = sorted(f for f in os.listdir(args.data_dir) if "train" in f and f.endswith(".npy"))[0]
    tokens = np.asarray(load_tokens(os.path.join(args.data_dir, shard)), dtype=np.int64)
    n = args.B * args.T
    for step in range(args.steps):
        t0 = time.perf_counter()
        x = torch.from_numpy(tokens[step * n:(step + 1) * n].copy()).view(args.B, args.T)
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels: every position but the last
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        print(f"dt_ms {(time.perf_counter() - t0) * 1000:.1f} loss {loss.item():.4f}", flush=True)


def run_row(args, row, env):
    """(step times (ms), peak memory GB or None) of one process of `row`: train.py prints the peak RSS above the
    process before the model after its second step."""
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = os.path.join(tmp, "out")
        if row == "peft-lora":
            cmd = [sys.executable, "-m", "bench.train_vs_peft", "--peft_child", *child_args(args)]
        else:
            cmd = train_py_command(args, row, out_dir)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"{row} failed ({' '.join(cmd)}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        if row == "peft-lora":
            return [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("dt_ms ")], None
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            return [r["dt_ms"] for r in map(json.loads, f) if "dt_ms" in r], common.train_py_peak_gb(done.stdout)


def child_args(args):
    return ["--model", args.model, "--data_dir", args.data_dir, "--B", str(args.B), "--T", str(args.T),
            "--steps", str(args.steps), "--r", str(args.r)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="models/smollm2-135m-instruct")
    p.add_argument("--data_dir", default="data/shakespeare_romances_smollm2-135m-instruct")
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--steps", type=int, default=7, help="steps per process; steps 2 .. steps-1 are timed")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--out_dir", default="bench/results")
    p.add_argument("--peft_child", action="store_true", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.peft_child:
        return peft_loop(args)
    args.model, args.data_dir = os.path.abspath(args.model), os.path.abspath(args.data_dir)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    if any(r not in ROWS for r in rows) or args.steps < 4:
        raise SystemExit(f"--rows {args.rows} --steps {args.steps}: rows among {','.join(ROWS)}, steps >= 4")
    for path, make in ((args.model, "make smollm2"), (args.data_dir, "python fineweb.py --source shakespeare-romances "
                                                      f"--tokenizer {args.model}")):
        if not os.path.isdir(path):
            raise SystemExit(f"{path} does not exist: make it with `{make}`")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    per_round = {r: [] for r in rows}  # row -> [median step ms of each round]
    every = {r: [] for r in rows}
    peaks = {r: [] for r in rows}
    for k in range(args.rounds):
        for row in rows:
            times, peak = run_row(args, row, env)
            times = times[2:]
            if peak is not None:
                peaks[row].append(peak)
            per_round[row].append(statistics.median(times))
            every[row] += times
            print(f"round {k + 1}/{args.rounds} {row:16s} steps 2-{args.steps - 1}: "
                  + " ".join(f"{t:.0f}" for t in times) + " ms", flush=True)
    table = [dict(row=r, median_ms=statistics.median(per_round[r]), min_ms=min(every[r]), max_ms=max(every[r]),
                  rounds=" ".join(f"{t:.0f}" for t in per_round[r]),
                  peak_gb=max(peaks[r]) if peaks[r] else None) for r in rows]
    ratios = {f"{a} / {b}": statistics.median(x / y for x, y in zip(per_round[a], per_round[b]))
              for a, b in RATIOS if a in rows and b in rows}
    md = common.markdown_table(table, [("row", "row", None), ("step ms (median of rounds)", "median_ms",
                                        lambda x: f"{x:.0f}"), ("min", "min_ms", lambda x: f"{x:.0f}"),
                                       ("max", "max_ms", lambda x: f"{x:.0f}"), ("per round", "rounds", None),
                                       ("peak GB (train.py's, above idle)", "peak_gb",
                                        lambda x: "-" if x is None else f"{x:.2f}")])
    md += "\n\nPaired ratios (median over rounds of the per-round ratio):\n\n" + "\n".join(
        f"- {k}: {v:.3f}" for k, v in ratios.items())
    print(md)
    env_info = common.environment("cpu", args.threads)
    name = f"train_vs_peft_{os.path.basename(os.path.normpath(args.model))}"
    command = " ".join(["python -m bench.train_vs_peft", *argv])
    print("wrote", *common.save_results(args.out_dir, name, env_info, vars(args), table, md, dict(ratios=ratios),
                                        command=command))
    return table, ratios


if __name__ == "__main__":
    main()
