"""Arithmetic prompts with checkable answers, made offline, for objective='grpo': sums and products.

    python -m tasks.arithmetic --out data/arithmetic                  # -> train.jsonl, val.jsonl
    python -m tasks.arithmetic --out data/arithmetic3 --digits 3      # three-digit operands

Each record is a chat that ends with the question, and the answer as a string (prepare_sft.py's prompt records):

    {"messages": [{"role": "system", "content": "Answer with the number only."},
                  {"role": "user", "content": "3 + 4"}, {"role": "assistant", "content": "7"},
                  {"role": "user", "content": "6 * 8"}], "answer": "48"}

One worked example before the question shows the format (the number, then the end of the turn); without it
SmolLM2-135M-Instruct explains instead of answering. --digits 1 (the default) is every a + b and a * b for
a, b in 0..9: 200 facts, 40 held out (val), the rest for training; more digits draw --n operand pairs at random.
What SmolLM2-135M-Instruct gets right before any training (measured on CPU, 10 one-digit facts of each operation,
8 samples each at temperature 1; greedy in parentheses): sums 14/80 (4/10), products 17/80 (1/10); two-digit sums
about 0/64. So one digit is arithmetic the base can sometimes do, and GRPO has rewards to compare; two and three
digits are there to measure what it cannot (docs/grpo.md). Deterministic: the same --seed gives the same files.
"""
import argparse
import json
import random
import sys
from pathlib import Path

from tools.atomic import atomic_path

SYSTEM = "Answer with the number only."
EXAMPLE = ("3 + 4", "7")  # the one worked example every prompt shows
OPERATIONS = {"+": lambda a, b: a + b, "*": lambda a, b: a * b}


def record(a, op, b):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": EXAMPLE[0]},
                {"role": "assistant", "content": EXAMPLE[1]}, {"role": "user", "content": f"{a} {op} {b}"}]
    return {"messages": messages, "answer": str(OPERATIONS[op](a, b))}


def problems(digits, n, rng):
    """(a, op, b) triples: every one of one digit, else n distinct ones with `digits`-digit operands."""
    if digits == 1:
        return [(a, op, b) for op in OPERATIONS for a in range(10) for b in range(10)]
    low, high = 10 ** (digits - 1), 10 ** digits - 1
    if n > len(OPERATIONS) * (high - low + 1) ** 2:
        raise ValueError(f"--n={n} is more than the {digits}-digit problems there are")
    chosen = set()
    while len(chosen) < n:
        chosen.add((rng.randint(low, high), rng.choice(list(OPERATIONS)), rng.randint(low, high)))
    return sorted(chosen)


def make(out_dir, digits=1, n=1000, n_val=40, seed=0):
    """Write out_dir/train.jsonl and out_dir/val.jsonl (atomically); returns their record counts."""
    rng = random.Random(seed)
    items = problems(digits, n, rng)
    rng.shuffle(items)
    if not 0 < n_val < len(items):
        raise ValueError(f"--n_val={n_val}: keep at least one of the {len(items)} problems for each split")
    splits = {"val": items[:n_val], "train": items[n_val:]}
    for name, rows in splits.items():
        with atomic_path(Path(out_dir) / f"{name}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record(*row)) + "\n" for row in rows)
    return len(splits["train"]), len(splits["val"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/arithmetic")
    parser.add_argument("--digits", type=int, default=1, choices=(1, 2, 3), help="digits of each operand")
    parser.add_argument("--n", type=int, default=1000, help="problems to draw (--digits 2 or 3)")
    parser.add_argument("--n_val", type=int, default=40, help="problems held out for val")
    parser.add_argument("--seed", type=int, default=0)
    from tools.errors import UserError, report_user_errors
    args = parser.parse_args(report_user_errors(sys.argv[1:]))
    try:
        n_train, n_val = make(args.out, args.digits, args.n, args.n_val, args.seed)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"{args.out}: {n_train} train and {n_val} val prompts ({args.digits}-digit sums and products)")
