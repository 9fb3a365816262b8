"""Prompt records from a reasoning-gym dataset, for objective='grpo' with grpo_reward='reasoning_gym'.

    pip install -r requirements-grpo.txt                         # reasoning-gym: the optional extra
    python -m tasks.reasoning_tasks --task basic_arithmetic --out data/rg_arithmetic     # -> train.jsonl, val.jsonl

reasoning-gym (Apache-2.0) generates procedural tasks offline, each with a verifier (score_answer). Every record
names its task and keeps its entry's metadata, which is what the verifier reads (objectives/rewards.py):

    {"messages": [{"role": "user", "content": "Calculate 5 - 3 - 6. ..."}], "answer": "-4",
     "task": "basic_arithmetic", "metadata": {...}}

The question is reasoning-gym's own; --suffix adds an instruction after it (by default: give the answer only).
Train and val are two datasets of the same task with different seeds (--seed, --seed + 1).
"""
import argparse
import json
import sys
from pathlib import Path

from tools.atomic import atomic_path
from tools.errors import UserError

SUFFIX = "\nGive only the final answer."


def records(task, n, seed, suffix=SUFFIX):
    try:
        import reasoning_gym
    except ImportError:
        raise UserError("tasks.reasoning_tasks needs the package reasoning-gym: pip install -r "
                        "requirements-grpo.txt") from None
    try:
        dataset = reasoning_gym.create_dataset(task, size=n, seed=seed)
    except ValueError as e:
        raise UserError(f"--task {task}: {e}") from None
    return [{"messages": [{"role": "user", "content": entry["question"] + suffix}], "answer": str(entry["answer"]),
             "task": task, "metadata": json.loads(json.dumps(entry["metadata"], default=str))} for entry in dataset]


def make(out_dir, task, n=200, n_val=40, seed=0, suffix=SUFFIX):
    """Write out_dir/train.jsonl and out_dir/val.jsonl (atomically); returns their record counts."""
    splits = {"train": records(task, n, seed, suffix), "val": records(task, n_val, seed + 1, suffix)}
    for name, rows in splits.items():
        with atomic_path(Path(out_dir) / f"{name}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return len(splits["train"]), len(splits["val"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="basic_arithmetic", help="a reasoning_gym dataset name")
    parser.add_argument("--out", default=None, help="default: data/rg_<task>")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--n_val", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--suffix", default=SUFFIX, help="text after each question")
    from tools.errors import report_user_errors
    args = parser.parse_args(report_user_errors(sys.argv[1:]))
    out = args.out or f"data/rg_{args.task}"
    n_train, n_val = make(out, args.task, args.n, args.n_val, args.seed, args.suffix)
    print(f"{out}: {n_train} train and {n_val} val prompts of reasoning_gym's {args.task}")
