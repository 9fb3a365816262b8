"""What does LoRA learn, and what does it forget, against full fine-tuning? SmolLM2-135M-Instruct on two SFT tasks.

    python -m bench.lora_vs_full                    # both tasks, every row, the sweep, 3 seeds: ~2 h on 2 CPU cores
    python -m bench.lora_vs_full --resume           # continue a cut-short run: skips the runs its results hold
    python -m bench.lora_vs_full --costs            # each row's peak memory and step time measured again (~15 min)
    python -m bench.lora_vs_full --quick            # speakers, 4 rows, 6 steps, 1 seed: a few minutes
    python -m bench.lora_vs_full --smoke            # a tiny random base and tiny tasks, in this process (the tests)
    python -m bench.lora_vs_full --tasks speakers --rows full,"lora r=16" --seeds 1

Held against three published results:
- Biderman et al. (2024), "LoRA Learns Less and Forgets Less": LoRA learns less of the target task than full
  fine-tuning and forgets less of what the base could do; full fine-tuning's weight updates have 10-100x the rank
  of the LoRA ranks in use.
- Schulman et al. (2025), "LoRA Without Regret": LoRA on every layer, MLP included, matches full fine-tuning on
  small and medium SFT; its best learning rate is about 10x full fine-tuning's; it tolerates large batches less.
- PEFT's method comparison on MetaMathQA: LoRA and rsLoRA among the best, DoRA slightly below LoRA, AdaLoRA,
  prompt tuning and prefix tuning far below.

Tasks (TASKS): who speaks these lines (make sft's task; exact match of the name) and two-digit sums and products
with worked answers ending "The answer is N." (the number is checked: numeric match). Rows (ROWS): full
fine-tuning; LoRA r=1, 4, 16, 64 on all seven projections; LoRA r=16 on attention only; rsLoRA, DoRA, PiSSA, QLoRA
(NF4 base) at r=16; AdaLoRA 12 -> 8; prompt tuning; prefix tuning. Every LoRA row keeps alpha = 32, so the scale
alpha / r shrinks as r grows (the 1/r parametrisation under which one learning rate serves every rank).
Each run is a fresh `python train.py` (its own out_dir in the work folder, deleted once measured unless --keep):
32 steps of 512 tokens (speakers: 8 rows of 64, ~12 packed examples; arithmetic: 4 rows of 128, one worked example
each), 10% warmup, cosine decay to a tenth of the rate, no weight decay. Short runs favour a grid's higher rates.

Learning rates: full fine-tuning and LoRA r=16 are swept (GRIDS) on each task at the first seed; each family's
best rate (held-out accuracy at the end; ties: the lower best val loss) then serves every row of the family:
'full', and 'lora' = every LoRA variant (rsLoRA, DoRA, PiSSA, QLoRA, AdaLoRA). rsLoRA at that rate has a 4x larger
scale at r=16 (alpha / sqrt(r) = 8 against alpha / r = 2): it is not retuned. Prompt and prefix tuning run at their
usual rates (FIXED_RATES), not swept, and on unpacked rows (one example a row: fewer examples per step at the same
B x T tokens). Full fine-tuning and LoRA r=16 then run at the other seeds too: their rows are mean ± std.

Measures, each row: the held-out accuracy (greedy, every eval_every steps: a curve; the last one is at step
max_steps - 1, before that step's update) and val loss (the same steps); forgetting (evals/forgetting.py): the
tuned model's loss on the base's own greedy replies to 40 open prompts unrelated to the tasks, minus the base's, and
its accuracy on the closed questions the base answers right (1.0 for the base); cost: trainable parameters, peak
memory (train.py's measured peak), median step time (--costs measures both again, in short runs with evaluations
off, one row at a time: costs need an idle machine, learning and forgetting do not). The base's replies and known
questions are computed once and kept in the work folder (bench/lora_vs_full_world.py). For the best full run of
each task, the effective rank of W_tuned - W_base per projection (bench/lora_vs_full_report.py), against the LoRA
ranks of the table.
Outputs: bench/results/cpu_lora_vs_full.{json,md} (written after every run) and three PNGs.
"""
import argparse
import contextlib
import io
import os
import re
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile

from bench import lora_vs_full_report as report
from bench.common import ROOT, cpu_threads, device_label, git_commit, train_py_peak_gb
from bench.lora_vs_full_world import base_measures, model_id, prepare_data, smoke_world

SEVEN = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
ATTENTION = "q_proj,k_proj,v_proj,o_proj"
ALPHA = 32.0


def lora(r, targets=SEVEN, **extra):
    return ("lora", "lora", dict(lora_r=r, lora_alpha=ALPHA, lora_targets=targets, **extra))


ROWS = {  # name -> (family: whose learning rate it takes, peft_method, train.py settings)
    "full": ("full", "full", {}),
    "lora r=1": lora(1), "lora r=4": lora(4), "lora r=16": lora(16), "lora r=64": lora(64),
    "lora r=16 attention": lora(16, ATTENTION),
    "rslora r=16": lora(16, lora_rslora=True),
    "dora r=16": lora(16, lora_use_dora=True),
    "pissa r=16": lora(16, lora_init="pissa"),
    "qlora r=16 (nf4)": lora(16, quantize="nf4"),
    "adalora 12->8": ("lora", "adalora", dict(adalora_init_r=12, adalora_target_r=8, lora_alpha=ALPHA,
                                              lora_targets=SEVEN)),
    "prompt": ("prompt", "prompt", dict(num_virtual_tokens=20, prompt_init="sample_vocab", packing=False)),
    "prefix": ("prefix", "prefix", dict(num_virtual_tokens=20, prefix_projection=True, packing=False)),
}
SWEPT = {"full": "full", "lora": "lora r=16"}  # family -> the row its learning rates are swept on
GRIDS = {"full": (1e-5, 3e-5, 1e-4), "lora": (3e-4, 1e-3, 3e-3)}  # about 10x apart, as LoRA Without Regret finds
FIXED_RATES = {"prompt": 3e-2, "prefix": 3e-3}  # bench/peft_methods.py's
TASKS = {  # name -> the command writing its train.jsonl / val.jsonl, SFT rows, the held-out match, eval prompts, eval s
    "speakers": dict(command=["-m", "tasks.shakespeare_speakers"], block_size=64, batch_size=8, match="exact",
                     eval_limit=64, eval_s=6),
    "arithmetic": dict(command=["-m", "tasks.arithmetic", "--worked", "--digits", "2"], block_size=128, batch_size=4,
                       match="numeric", eval_limit=32, eval_s=15),
}
MODES = {  # what a mode runs; a flag given on the command line wins
    "full": dict(steps=32, eval_every=8, eval_iters=4, eval_limit=0, open_limit=0, closed_limit=0, reply_tokens=48,
                 grids=GRIDS, seeds="1,2,3", tasks=",".join(TASKS), rows=",".join(ROWS)),
    "quick": dict(steps=6, eval_every=3, eval_iters=2, eval_limit=16, open_limit=8, closed_limit=20, reply_tokens=24,
                  grids={"full": (3e-5,), "lora": (1e-3,)}, seeds="1", tasks="speakers",
                  rows="full,lora r=16,lora r=1,prompt"),
    "smoke": dict(steps=3, eval_every=2, eval_iters=1, eval_limit=4, open_limit=3, closed_limit=4, reply_tokens=4,
                  grids={"full": (1e-3, 1e-2), "lora": (1e-2, 3e-2)}, seeds="1,2", tasks=",".join(TASKS),
                  rows=",".join(ROWS)),
}
COST_S = dict(start=10, val_eval=2, measure=20, full_save=8,  # seconds on 2 idle CPU cores
              step={"full": 3.5, "lora": 2.7, "prompt": 2.5, "prefix": 2.5})
SETTINGS = ("model", "steps", "eval_every", "eval_iters", "eval_limit", "open_limit", "closed_limit", "reply_tokens",
            "smoke")  # what a result depends on: --resume refuses results made with other values
COST_STEPS = 6  # --costs: steps a row (the median of steps 1-5)
DIVERGED = "stopping without applying this update"  # train.py's line for a non-finite loss or gradient


# ---- one run ------------------------------------------------------------------------------------------------------
def out_dir_of(cfg, task, row, lr, seed):
    slug = "".join(c if c.isalnum() else "_" for c in row)
    return os.path.join(cfg["work"], "runs", f"{task}-{slug}-lr{lr:g}-s{seed}")


def median_step_s(log):
    """The median seconds a step of a train.py log's records (step 0 left out: it warms up); None without steps."""
    step_ms = [r["dt_ms"] for r in log if "dt_ms" in r][1:]
    return statistics.median(step_ms) / 1000 if step_ms else None


def train_flags(cfg, task, row, lr, seed, out_dir, **over):
    """train.py's --key=value flags for one run (over: settings that replace the run's)."""
    _, method, settings = ROWS[row]
    spec, steps = cfg["task_table"][task], over.get("max_steps", cfg["steps"])  # --costs runs COST_STEPS
    flags = dict(init_from=cfg["model"], data_dir=cfg["data"][task], out_dir=out_dir, objective="sft", device="cpu",
                 dtype="float32", compile=False, block_size=spec["block_size"], batch_size=spec["batch_size"],
                 total_batch_size=spec["block_size"] * spec["batch_size"], max_steps=steps,
                 warmup_steps=max(1, steps // 10), max_lr=lr, min_lr=lr / 10, weight_decay=0.0,
                 eval_interval=cfg["eval_every"], eval_iters=cfg["eval_iters"], eval_generate_every=cfg["eval_every"],
                 eval_generate_limit=cfg["eval_limit"] or spec["eval_limit"], sample_interval=0, checkpoint_interval=0,
                 eval_generate_match=spec["match"], log_interval=10, seed=seed, overwrite=True, peft_method=method,
                 **settings)
    if method == "adalora":  # prune from 10% of the steps to 80%, as bench/peft_methods.py
        flags.update(adalora_tinit=steps // 10, adalora_tfinal=steps // 5)
    flags.update(over)
    return [f"--{k}={v}" for k, v in flags.items()]


def launch(cfg, argv):
    """(exit code, printed text) of `python train.py ARGV`: a fresh process; with --smoke this one (seconds)."""
    if not cfg["smoke"]:
        env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]))
        done = subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                              check=False)
        return done.returncode, done.stdout + done.stderr
    printed, saved_argv = io.StringIO(), sys.argv
    sys.argv = ["train.py", *argv]
    try:
        with contextlib.redirect_stdout(printed):
            runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
        return 0, printed.getvalue()
    except SystemExit as e:
        return (0 if e.code is None else e.code if isinstance(e.code, int) else 1), printed.getvalue()
    finally:
        sys.argv = saved_argv


def run(cfg, task, row, lr, seed, sweep, base, tok):
    """Train one row, read its log and printout, measure the tuned model's forgetting: its record."""
    from evals.exact_match import log_key
    from evals.forgetting import question_accuracy, reply_nll
    from training.checkpoint import load_model
    from training.run_dir import read_log
    out_dir = out_dir_of(cfg, task, row, lr, seed)
    code, printed = launch(cfg, train_flags(cfg, task, row, lr, seed, out_dir))
    if code != 0 and DIVERGED not in printed:
        raise SystemExit(f"{task} / {row} / lr {lr:g} / seed {seed} failed (exit {code}):\n{printed[-3000:]}")
    log = read_log(out_dir, "sft")[1] if os.path.isfile(os.path.join(out_dir, "log.jsonl")) else []
    key = log_key(cfg["task_table"][task]["match"])
    acc = [(r["step"], r[key]) for r in log if key in r]
    val = [(r["step"], r["val_loss"]) for r in log if r.get("val_loss") is not None]
    params = sum(int(n.replace(",", "")) for n in re.findall(r"tensors: \d+, with ([\d,]+) parameters", printed))
    record = dict(task=task, row=row, family=ROWS[row][0], lr=lr, seed=seed, sweep=sweep, params=params,
                  peak_gb=train_py_peak_gb(printed), step_s=median_step_s(log),
                  acc_steps=[s for s, _ in acc], accuracy=[a for _, a in acc], val_steps=[s for s, _ in val],
                  val_loss=[v for _, v in val], before=acc[0][1] if acc else None, after=None, best_val=None,
                  forgetting=None, questions=None)  # the last four stay None for a run that diverged
    if code == 0:
        tuned = load_model(out_dir)
        record.update(after=acc[-1][1], best_val=min(record["val_loss"]),
                      forgetting=reply_nll(tuned, base["pairs"]) - base["nll"],
                      questions=question_accuracy(tuned, tok, base["known"]))
    if not cfg["keep"] and not (row == "full" and sweep):  # full sweep runs: kept until their rank is measured
        shutil.rmtree(out_dir, ignore_errors=True)
    return record


def measure_rank(cfg, state, task):
    """The effective rank of the best full run's update (once its sweep is done); then its out_dirs go."""
    from training.checkpoint import load_model
    lr = state["rates"][task].get("full")
    out_dir = out_dir_of(cfg, task, "full", lr, cfg["seeds"][0]) if lr is not None else None
    if out_dir is None or not os.path.isfile(os.path.join(out_dir, "ckpt.pt")):
        print(f"{task}: no checkpoint of the best full run ({out_dir}): its update's rank is not measured")
    else:
        state["ranks"][task] = dict(lr=lr, rows=report.update_ranks(load_model(cfg["model"]), load_model(out_dir)))
    if not cfg["keep"]:
        for rate in cfg["grids"]["full"]:
            shutil.rmtree(out_dir_of(cfg, task, "full", rate, cfg["seeds"][0]), ignore_errors=True)


def measure_costs(cfg, state):
    """--costs: each row's peak memory and median step time, from a fresh train.py of COST_STEPS steps with
    evaluations off (its peak printed after the second step; steps 1 on timed), replacing what the results hold for
    that task and row: for results whose costs were measured wrongly or on a busy machine."""
    from training.run_dir import read_log
    for task in cfg["tasks"]:
        for row in cfg["rows"]:
            got = [r for r in state["runs"] if r["task"] == task and r["row"] == row]
            if not got:
                continue
            out_dir = out_dir_of(cfg, task, row, got[0]["lr"], got[0]["seed"]) + "-costs"
            code, printed = launch(cfg, train_flags(cfg, task, row, got[0]["lr"], got[0]["seed"], out_dir,
                                                    max_steps=COST_STEPS, warmup_steps=1, eval_interval=1000,
                                                    eval_iters=1, eval_generate_every=0))
            if code != 0:
                raise SystemExit(f"--costs: {task} / {row} failed (exit {code}):\n{printed[-3000:]}")
            step_s = median_step_s(read_log(out_dir, "sft")[1])
            shutil.rmtree(out_dir, ignore_errors=True)
            for r in got:
                r.update(peak_gb=train_py_peak_gb(printed), step_s=step_s)
            print(f"{task} {row:>20}: peak {got[0]['peak_gb']} GB, {got[0]['step_s']:.2f} s/step", flush=True)
    runs_commit = (state.get("costs") or {}).get("runs_commit", state["commit"])  # --costs again: still the runs'
    state["costs"] = dict(commit=git_commit(), runs_commit=runs_commit)


# ---- the plan -----------------------------------------------------------------------------------------------------
def planned(cfg, task):
    """[(row, lr or None for its family's chosen rate, seed, sweep)]: the sweeps, the other rows, the other seeds."""
    families = {ROWS[row][0] for row in cfg["rows"]}
    first = cfg["seeds"][0]
    runs = [(SWEPT[f], lr, first, True) for f in SWEPT if f in families for lr in cfg["grids"][f]]
    runs += [(row, None, first, False) for row in cfg["rows"] if row not in SWEPT.values()]
    runs += [(row, None, seed, False) for row in SWEPT.values() if row in cfg["rows"] for seed in cfg["seeds"][1:]]
    return runs


def rate(cfg, state, task, row):
    family = ROWS[row][0]
    return FIXED_RATES.get(family, state["rates"].get(task, {}).get(family))


def choose_rates(cfg, state, task):
    """A family whose sweep has finished gets its best rate; the full family's then has its update's rank measured."""
    for family, swept in SWEPT.items():
        chosen = state["rates"].setdefault(task, {})
        grid_runs = [r for r in state["runs"] if r["task"] == task and r["row"] == swept and r.get("sweep")
                     and r["seed"] == cfg["seeds"][0] and r["lr"] in cfg["grids"][family]]
        if family not in chosen and len(grid_runs) == len(cfg["grids"][family]):
            chosen[family] = report.best_rate(grid_runs)
            if family == "full":
                measure_rank(cfg, state, task)


def estimate_s(cfg, todo):
    """Seconds the runs todo [(task, row)] take, from COST_S (2 CPU cores)."""
    evals = len({s for s in range(cfg["steps"]) if s % cfg["eval_every"] == 0} | {cfg["steps"] - 1})
    return sum(COST_S["start"] + COST_S["measure"] + cfg["steps"] * COST_S["step"][ROWS[row][0]]
               + (COST_S["full_save"] if row == "full" else 0)
               + evals * (cfg["task_table"][task]["eval_s"] + COST_S["val_eval"]) for task, row in todo)


# ---- the bench ------------------------------------------------------------------------------------------------------
def settings_of(cfg):
    return dict({k: cfg[k] for k in SETTINGS}, model=model_id(cfg["model"]))


def write(cfg, state, base, command, plots=False):
    """The results (json, md) of the runs so far; with plots the PNGs too."""
    tokens = {spec["block_size"] * spec["batch_size"] for spec in cfg["task_table"].values()}
    notes = [(f"{cfg['steps']} steps of {'/'.join(map(str, sorted(tokens)))} tokens a run; accuracy every "
              f"{cfg['eval_every']} steps (the last at step {cfg['steps'] - 1}, before its update); forgetting and "
              f"closed questions on the final model"),
             (f"the base: reply NLL {base['nll']:.4f} nats/token on its own greedy replies to {len(base['pairs'])} "
              f"open prompts; it answers {len(base['known'])} of {base['asked']} closed questions right (the ones "
              f"scored)"),
             ("LoRA rows: alpha 32 at every rank; every LoRA variant at LoRA r=16's best rate, so rsLoRA runs with a "
              "4x larger scale (alpha / sqrt(r) = 8 vs alpha / r = 2)"),
             (f"prompt and prefix tuning at fixed rates {FIXED_RATES}, not swept, on unpacked rows; QLoRA's forgetting "
              "includes its NF4 base; the update ranks compare with the LoRA ranks 1, 4, 16, 64")]
    if state.get("costs"):
        notes.append(f"peak GB and step s: each row measured again by --costs at commit {state['costs']['commit']} "
                     f"({COST_STEPS} steps, evaluations off, one process at a time); the runs at commit "
                     f"{state['costs']['runs_commit']}")
    model = "tiny random LLaMA (--smoke)" if cfg["smoke"] else os.path.basename(cfg["model"])
    if state.get("costs"):  # the plots show the runs: name their commit beside the costs' (the file's)
        model += f" | runs at commit {state['costs']['runs_commit']}"
    return report.write(cfg, state, list(ROWS), SWEPT, lambda task, row: rate(cfg, state, task, row), notes,
                        dict(settings=settings_of(cfg), base={k: base[k] for k in ("nll", "known", "asked")},
                             costs=state.get("costs")),
                        command, model, plots)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    p.add_argument("--tasks", help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--rows", help="comma-separated names of ROWS")
    p.add_argument("--seeds", help="comma-separated; the first is the sweep's (default 1,2,3)")
    p.add_argument("--steps", type=int, help="steps a run (default 32)")
    p.add_argument("--eval_every", type=int, help="steps between evaluations (default 8)")
    p.add_argument("--work", help="data, base measures and out_dirs (default out-lora-vs-full; --smoke: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep every run's out_dir")
    p.add_argument("--resume", action="store_true", help="skip the runs the results file already holds")
    p.add_argument("--costs", action="store_true", help="measure each row's peak memory and step time again, into the "
                   f"results file ({COST_STEPS} steps a row, evaluations off)")
    p.add_argument("--quick", action="store_true", help="speakers, 4 rows, 1 rate a family, 6 steps, 1 seed")
    p.add_argument("--smoke", action="store_true", help="a tiny random base and tiny tasks, train.py in this process")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "results"))
    return p.parse_args(argv)


def configure(args):
    from tools.errors import UserError
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = dict(MODES[mode], **{k: v for k, v in vars(args).items() if v is not None})
    cfg.update(name="lora_vs_full" + ("" if mode == "full" else f"_{mode}"), threads=cpu_threads(args.threads),
               task_table=TASKS, all_tasks=list(TASKS), model=os.path.abspath(cfg["model"]),
               tasks=[t.strip() for t in str(cfg["tasks"]).split(",") if t.strip()],
               rows=[r.strip() for r in str(cfg["rows"]).split(",") if r.strip()])
    for what, names, known in (("--tasks", cfg["tasks"], TASKS), ("--rows", cfg["rows"], ROWS)):
        if not names or any(n not in known for n in names):
            raise UserError(f"{what} {','.join(names)}: use names among {', '.join(known)}")
    try:
        cfg["seeds"] = [int(s) for s in str(cfg["seeds"]).split(",")]
    except ValueError:
        raise UserError(f"--seeds {cfg['seeds']}: comma-separated integers, e.g. 1,2,3") from None
    if cfg["steps"] < 2 or cfg["eval_every"] < 1:
        raise UserError(f"--steps {cfg['steps']} --eval_every {cfg['eval_every']}: at least 2 steps, evaluations every "
                        f">= 1")
    cfg["rows"] = [row for row in ROWS if row in cfg["rows"]]  # ROWS' order
    return cfg


def main(argv=None):
    args = parse(argv)
    cfg = configure(args)
    command = "python -m bench.lora_vs_full " + " ".join(argv if argv is not None else sys.argv[1:])
    with contextlib.ExitStack() as stack:
        if cfg.get("work") is None:
            cfg["work"] = (stack.enter_context(tempfile.TemporaryDirectory(prefix="lora_vs_full_")) if cfg["smoke"]
                           else os.path.join(ROOT, "out-lora-vs-full"))
        os.makedirs(cfg["work"], exist_ok=True)
        if cfg["smoke"]:
            cfg.update(smoke_world(cfg["work"], TASKS))
        else:
            cfg.update(tokenizer=cfg["model"], data={task: prepare_data(cfg, task) for task in cfg["tasks"]})
        return bench(cfg, command)


def bench(cfg, command):
    from tokenization import load_tokenizer
    from tools.errors import UserError
    path = os.path.join(cfg["out_dir"], f"{device_label('cpu')}_{cfg['name']}.json")  # save_results' name for it
    flag = "--costs" if cfg["costs"] else "--resume" if cfg["resume"] else None  # they read the results file
    state = (report.previous(path, settings_of(cfg), flag) if flag else None) or dict(runs=[], rates={}, ranks={})
    if cfg["costs"] and not state["runs"]:
        raise UserError(f"--costs: no results at {path} to measure the rows of; run the bench first")
    tok = load_tokenizer(cfg["tokenizer"])
    base = base_measures(cfg, tok)
    if cfg["costs"]:
        measure_costs(cfg, state)
    else:
        train_rows(cfg, state, base, tok, command)
    tables, paths, pngs = write(cfg, state, base, command, plots=True)
    with open(paths[1]) as f:
        print(f.read())
    if pngs is None:
        print("no PNGs: matplotlib is not installed")
    return tables, paths, pngs


def train_rows(cfg, state, base, tok, command):
    """Every planned run the results do not hold yet, the results written after each (the PNGs after each task)."""
    done = {(r["task"], r["row"], r["lr"], r["seed"]) for r in state["runs"]}
    plans = {task: planned(cfg, task) for task in cfg["tasks"]}
    todo = [(task, row) for task in cfg["tasks"] for row, lr, seed, _ in plans[task]
            if not any(d[:2] == (task, row) and d[3] == seed and (lr is None or d[2] == lr) for d in done)]
    print(f"{sum(map(len, plans.values()))} runs planned, {len(todo)} to run: about "
          f"{estimate_s(cfg, todo) / 60:.0f} min on 2 CPU cores (an estimate)", flush=True)
    for task in cfg["tasks"]:
        for row, lr, seed, sweep in plans[task]:
            choose_rates(cfg, state, task)  # (a sweep finished by an earlier, cut-short bench too)
            lr = lr if lr is not None else rate(cfg, state, task, row)
            if lr is None:
                print(f"{task}: every {ROWS[row][0]} rate diverged, so {row} does not run")
            elif (task, row, lr, seed) not in done:
                record = run(cfg, task, row, lr, seed, sweep, base, tok)
                state["runs"].append(record)
                state.pop("costs", None)  # a new run's costs are its own: no longer every row's from --costs
                done.add((task, row, lr, seed))
                print(f"{task} {row:>20} lr {lr:<6g} seed {seed}: accuracy {record['before']} -> {record['after']}, "
                      f"forgetting {record['forgetting']}, closed questions {record['questions']}, "
                      f"{record['step_s']} s/step", flush=True)
                choose_rates(cfg, state, task)
                write(cfg, state, base, command)  # after every run: a cut-short bench keeps its rows
        write(cfg, state, base, command, plots=True)  # after every task: the PNGs


if __name__ == "__main__":
    from tools.errors import report_user_errors
    main(report_user_errors(sys.argv[1:]))
