"""Arithmetic with checkable answers, made offline: sums and products, as GRPO prompts or as worked SFT answers.

    python -m tasks.arithmetic --out data/arithmetic                  # -> train.jsonl, val.jsonl (GRPO prompts)
    python -m tasks.arithmetic --out data/arithmetic3 --digits 3      # three-digit operands
    python -m tasks.arithmetic --out data/arithmetic_worked --worked  # SFT chats with worked answers (two digits)

A prompt record (objective='grpo') is a chat that ends with the question, and the answer as a string
(prepare_sft.py's prompt records):

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

--worked writes SFT chats instead (objective='sft', both splits; the val reply is the reference of the exact
match, scored by its last number with eval_generate_match='numeric'):

    {"messages": [{"role": "system", "content": "Work it out in short steps, then end with \\"The answer is N.\\""},
                  {"role": "user", "content": "47 + 38"},
                  {"role": "assistant", "content": "40 + 30 = 70. 7 + 8 = 15. 70 + 15 = 85. The answer is 85."}]}

The reply splits the problem by place value, one operation a step: a sum adds the tens, then the units, then the
two; a product multiplies the first number by each place of the second, then adds the parts:

    47 * 38    47 * 30 = 1410. 47 * 8 = 376. 1410 + 376 = 1786. The answer is 1786.

Every problem of a size has replies of the same shape (a zero part is written too: 47 * 0 = 0), which a small model
imitates more easily than a varying one; one-digit problems are one step ("6 * 8 = 48."). With SmolLM2's tokenizer
(digits are single tokens) a two-digit example is 76-89 tokens: prepare_sft.py --block_size 96 holds every one.
SmolLM2-135M-Instruct before any training (greedy, the first 40 val prompts of seed 0, sft_eval.py --match numeric):
0.075 (3/40): 3 of 15 sums, 0 of 25 products; it explains in prose and seldom reaches the result.
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
WORKED_SYSTEM = 'Work it out in short steps, then end with "The answer is N."'


def record(a, op, b):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": EXAMPLE[0]},
                {"role": "assistant", "content": EXAMPLE[1]}, {"role": "user", "content": f"{a} {op} {b}"}]
    return {"messages": messages, "answer": str(OPERATIONS[op](a, b))}


# --- worked answers -----------------------------------------------------------------------------------------------
def places(x, width):
    """x split by place value, highest first: places(47, 2) = [40, 7]; places(305, 3) = [300, 0, 5]."""
    return [x // 10 ** k % 10 * 10 ** k for k in reversed(range(width))]


def sum_steps(a, b, width):
    """[(a's part, '+', b's part), ...] place by place: 40 + 30, then 7 + 8."""
    return list(zip(places(a, width), "+" * width, places(b, width)))


def product_steps(a, b, width):
    """[(a, '*', b's part), ...]: 47 * 30, then 47 * 8."""
    return [(a, "*", part) for part in places(b, width)]


WORK = {"+": sum_steps, "*": product_steps}  # operation -> its steps; the parts' results are then added


def worked_answer(a, op, b):
    """'40 + 30 = 70. 7 + 8 = 15. 70 + 15 = 85. The answer is 85.': each step one operation, then the result."""
    width = len(str(max(a, b)))
    parts = [(x, o, y, OPERATIONS[o](x, y)) for x, o, y in WORK[op](a, b, width)]
    steps = [f"{x} {o} {y} = {z}." for x, o, y, z in parts]
    result = OPERATIONS[op](a, b)
    if len(parts) > 1:
        steps.append(" + ".join(str(z) for *_, z in parts) + f" = {result}.")
    return " ".join(steps) + f" The answer is {result}."


def worked_record(a, op, b):
    return {"messages": [{"role": "system", "content": WORKED_SYSTEM}, {"role": "user", "content": f"{a} {op} {b}"},
                         {"role": "assistant", "content": worked_answer(a, op, b)}]}


# --- the problems and the files -----------------------------------------------------------------------------------
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


def make(out_dir, digits=None, n=1000, n_val=40, seed=0, worked=False):
    """Write out_dir/train.jsonl and out_dir/val.jsonl (atomically); returns their record counts. worked=False:
    GRPO prompt records (digits default 1); worked=True: SFT chats with worked answers (digits default 2)."""
    digits = digits or (2 if worked else 1)
    rng = random.Random(seed)
    items = problems(digits, n, rng)
    rng.shuffle(items)
    if not 0 < n_val < len(items):
        raise ValueError(f"--n_val={n_val}: keep at least one of the {len(items)} problems for each split")
    splits = {"val": items[:n_val], "train": items[n_val:]}
    write = worked_record if worked else record
    for name, rows in splits.items():
        with atomic_path(Path(out_dir) / f"{name}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(write(*row)) + "\n" for row in rows)
    return len(splits["train"]), len(splits["val"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/arithmetic")
    parser.add_argument("--digits", type=int, default=None, choices=(1, 2, 3),
                        help="digits of each operand (default 1; 2 with --worked)")
    parser.add_argument("--n", type=int, default=1000, help="problems to draw (--digits 2 or 3)")
    parser.add_argument("--n_val", type=int, default=40, help="problems held out for val")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worked", action="store_true", help="SFT chats with worked answers, not GRPO prompts")
    from tools.errors import UserError, report_user_errors
    args = parser.parse_args(report_user_errors(sys.argv[1:]))
    try:
        n_train, n_val = make(args.out, args.digits, args.n, args.n_val, args.seed, args.worked)
    except ValueError as e:
        raise UserError(str(e)) from None
    digits, what = args.digits or (2 if args.worked else 1), "worked answers" if args.worked else "prompts"
    print(f"{args.out}: {n_train} train and {n_val} val {what} ({digits}-digit sums and products)")
