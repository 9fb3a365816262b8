"""tasks/arithmetic.py: worked answers whose every step is right arithmetic, ending with the result; the files they
make (deterministic, disjoint splits, read by prepare_sft.py); the GRPO prompt records as they were; sft_eval.py
--match numeric on them."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import prepare_sft
from evals.exact_match import prompt_and_reference
from loaders.sft import read_examples
from tasks.arithmetic import make, worked_answer
from tokenization import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
STEP = re.compile(r"(\d+(?: [+*] \d+)+) = (\d+)")  # "40 + 30 = 70", "1410 + 376 = 1786"


def evaluate(expression):
    """An expression of non-negative integers, + and *, evaluated by Python (nothing else can reach eval)."""
    assert re.fullmatch(r"[\d +*]+", expression), expression
    return eval(expression, {"__builtins__": {}})


def steps_of(answer):
    """[(expression, claimed value), ...] and the final number of 'step. step. ... The answer is N.'"""
    *steps, last = answer.split(". ")
    final = re.fullmatch(r"The answer is (\d+)\.", last)
    assert final, answer
    parsed = [STEP.fullmatch(step.rstrip(".")) for step in steps]
    assert all(parsed), answer
    return [(m[1], int(m[2])) for m in parsed], int(final[1])


def read(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def problem(text):
    """(a, op, b) of '47 + 38'."""
    a, op, b = text.split()
    return int(a), op, int(b)


def question(record):
    return record["messages"][1]["content"]


# --- the worked answers -------------------------------------------------------------------------------------------
def test_the_examples_of_the_task_are_worked_as_written_out_by_hand():
    assert worked_answer(47, "+", 38) == "40 + 30 = 70. 7 + 8 = 15. 70 + 15 = 85. The answer is 85."
    assert worked_answer(47, "*", 38) == "47 * 30 = 1410. 47 * 8 = 376. 1410 + 376 = 1786. The answer is 1786."
    assert worked_answer(6, "*", 8) == "6 * 8 = 48. The answer is 48."


@pytest.mark.parametrize("digits", [1, 2, 3])
def test_every_step_is_right_arithmetic_on_the_operands_parts_and_ends_with_the_true_result(tmp_path, digits):
    make(tmp_path, digits, n=300, n_val=20, seed=digits, worked=True)
    records = read(tmp_path / "train.jsonl") + read(tmp_path / "val.jsonl")
    assert {problem(question(r))[1] for r in records} == {"+", "*"}
    for record in records:
        a, op, b = problem(question(record))
        true = a + b if op == "+" else a * b
        steps, final = steps_of(record["messages"][2]["content"])
        assert all(evaluate(expression) == value for expression, value in steps), steps
        assert final == true and steps[-1][1] == true
        parts = steps if len(steps) == 1 else steps[:-1]  # several parts, then their sum
        if len(steps) > 1:
            assert steps[-1][0] == " + ".join(str(value) for _, value in parts)
        left, right = zip(*(map(int, expression.split(f" {op} ")) for expression, _ in parts))
        if op == "+":  # a sum adds the operands place by place: the parts of each operand add up to it
            assert (sum(left), sum(right)) == (a, b)
        else:  # a product multiplies a by the places of b
            assert set(left) == {a} and sum(right) == b


def test_the_records_are_chats_of_system_user_assistant_with_the_system_asking_for_the_final_sentence(tmp_path):
    make(tmp_path, n=50, n_val=5, worked=True)  # two digits by default
    for record in read(tmp_path / "val.jsonl"):
        assert list(record) == ["messages"]  # no "answer": prepare_sft.py reads an SFT chat, not a GRPO prompt
        assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
        assert '"The answer is N."' in record["messages"][0]["content"]
        a, _, b = problem(question(record))
        assert 10 <= a <= 99 and 10 <= b <= 99


# --- the files ----------------------------------------------------------------------------------------------------
def test_the_same_seed_gives_the_same_files_and_the_splits_share_no_problem(tmp_path):
    counts = [make(tmp_path / name, 2, n=200, n_val=30, seed=seed, worked=True)
              for name, seed in (("a", 7), ("b", 7), ("c", 8))]
    assert counts == [(170, 30)] * 3
    for split in ("train.jsonl", "val.jsonl"):
        assert (tmp_path / "a" / split).read_bytes() == (tmp_path / "b" / split).read_bytes()
        assert (tmp_path / "a" / split).read_bytes() != (tmp_path / "c" / split).read_bytes()
    train, val = ({question(r) for r in read(tmp_path / "a" / split)} for split in ("train.jsonl", "val.jsonl"))
    assert len(train) == 170 and len(val) == 30 and not train & val


def test_prepare_sft_reads_the_files_and_each_val_reference_is_the_worked_answer(tmp_path):
    make(tmp_path, n=40, n_val=8, seed=1, worked=True)
    header = prepare_sft.prepare(tmp_path / "train.jsonl", tmp_path / "val.jsonl", tmp_path / "sft", block_size=128)
    assert header["kind"] == "sft" and header["splits"]["val"]["examples"] == 8
    assert header["splits"]["train"]["truncated"] == header["splits"]["val"]["truncated"] == 0
    tok = load_tokenizer(header["tokenizer"])  # GPT-2's, offline
    _, val = read_examples(tmp_path / "sft", "val")
    references = [tok.decode(prompt_and_reference(ids, mask, tok.eos_id)[1]).strip() for ids, mask in val]
    assert references == [r["messages"][2]["content"] for r in read(tmp_path / "val.jsonl")]


def test_the_command_line_writes_worked_two_digit_answers_and_without_worked_the_grpo_prompts(tmp_path):
    run = [sys.executable, "-m", "tasks.arithmetic", "--n", "30", "--n_val", "5"]
    said = []
    for args in (["--worked", "--out", str(tmp_path / "worked")], ["--out", str(tmp_path / "prompts")]):
        result = subprocess.run(run + args, cwd=ROOT, capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stderr
        said.append(result.stdout)
    assert "25 train and 5 val worked answers (2-digit sums and products)" in said[0]
    assert "195 train and 5 val prompts (1-digit sums and products)" in said[1]
    worked = read(tmp_path / "worked" / "val.jsonl")
    assert len(worked) == 5 and all(problem(question(r))[0] >= 10 for r in worked)
    prompts = read(tmp_path / "prompts" / "train.jsonl") + read(tmp_path / "prompts" / "val.jsonl")
    assert len(prompts) == 200  # every one-digit fact
    for record in prompts:  # the question last, after one example, and the answer beside the chat
        a, op, b = problem(record["messages"][3]["content"])
        assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant", "user"]
        assert record["answer"] == str(a + b if op == "+" else a * b)


# --- scored by sft_eval.py ----------------------------------------------------------------------------------------
def test_sft_eval_match_numeric_says_so_and_its_baseline_answers_the_most_frequent_result(tmp_path, capsys):
    from collections import Counter

    import sft_eval
    from model import GPT, GPTConfig
    make(tmp_path, 1, n_val=40, seed=2, worked=True)  # one digit: 0 is the most frequent result (0 * b, a * 0)
    prepare_sft.prepare(tmp_path / "train.jsonl", tmp_path / "val.jsonl", tmp_path / "sft", block_size=64)
    GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path / "m")
    results = {split: [a + b if op == "+" else a * b for a, op, b in (problem(question(r)) for r in
                                                                       read(tmp_path / f"{split}.jsonl"))]
               for split in ("train", "val")}
    counts = Counter(results["train"])
    assert all(n < counts[0] for result, n in counts.items() if result != 0)
    sft_eval.main(["--data", str(tmp_path / "sft"), "--model", str(tmp_path / "m"), "--match", "numeric"])
    lines = capsys.readouterr().out.splitlines()
    hits = results["val"].count(0)
    assert hits > 0
    assert lines[0] == f"numeric match on 40 val examples of {tmp_path / 'sft'}:"
    assert lines[1] == f"  always '0' (most frequent training answer, by numeric match): {hits / 40:.3f} ({hits}/40)"
    assert lines[2].startswith(f"  {tmp_path / 'm'}: ") and lines[2].endswith("/40)")
