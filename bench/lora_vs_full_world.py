"""The world a run of bench/lora_vs_full.py works in: the tasks' SFT data and the base's own measures, made once per
work folder; and --smoke's tiny stand-ins for both (the whole bench in seconds: what the tests run)."""
import hashlib
import json
import os
import subprocess
import sys

from bench.common import ROOT


def model_id(path):
    """The model as the results and caches name it: its path relative to the checkout when it lies inside it (a
    moved checkout or a worktree resumes its results), else its absolute path."""
    rel = os.path.relpath(path, ROOT)
    return path if rel.startswith("..") else rel


# ---- the real world: data and the base -------------------------------------------------------------------------------
def python(args):
    """`python ARGS` from the repository root; its output's end if it fails."""
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"python {' '.join(args)} failed:\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}")


def prepare_data(cfg, task):
    """The task's SFT folder in the work folder, made (as the Makefile makes it) when missing or of another model."""
    folder, spec = os.path.join(cfg["work"], "data", task), cfg["task_table"][task]
    sft, tokenizer = os.path.join(folder, "sft"), model_id(cfg["model"])  # relative paths: from ROOT, as python()
    header = os.path.join(sft, "sft.json")
    if os.path.isfile(header):
        with open(header) as f:
            if json.load(f)["tokenizer"] == tokenizer:
                return sft
    python([*spec["command"], "--out", folder])
    python(["prepare_sft.py", "--input", os.path.join(folder, "train.jsonl"), "--out", sft,
            "--val", os.path.join(folder, "val.jsonl"), "--block_size", str(spec["block_size"]), "--overwrite",
            "--tokenizer", tokenizer])
    return sft


def base_measures(cfg, tok):
    """The base's greedy replies to the open prompts, its reply NLL on them and the closed questions it knows:
    computed once per work folder and settings (base_forgetting.json)."""
    from evals import forgetting
    from tools.atomic import atomic_path
    from training.checkpoint import load_model
    with open(forgetting.SETS, "rb") as f:
        key = dict(model=model_id(cfg["model"]), reply_tokens=cfg["reply_tokens"], open_limit=cfg["open_limit"],
                   closed_limit=cfg["closed_limit"], sets=hashlib.sha256(f.read()).hexdigest()[:16])
    path = os.path.join(cfg["work"], "base_forgetting.json")
    if os.path.isfile(path):
        with open(path) as f:
            cached = json.load(f)
        if cached["key"] == key:
            return cached
    base = load_model(cfg["model"])
    pairs = forgetting.base_replies(base, tok, cfg["reply_tokens"], cfg["open_limit"])
    measures = dict(key=key, pairs=pairs, nll=forgetting.reply_nll(base, pairs),
                    known=forgetting.known_questions(base, tok, cfg["closed_limit"]),
                    asked=len(forgetting.sets()["closed"][:cfg["closed_limit"] or None]))
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(measures, f)
    return measures


# ---- --smoke's world -------------------------------------------------------------------------------------------------
def smoke_world(work, tasks):
    """A tiny random LLaMA (GPT-2's tokenizer, so that the forgetting prompts encode) and two tiny tasks of the same
    kinds as the real ones (tasks: bench.lora_vs_full's TASKS), scored as they are."""
    import random

    import torch

    from model import LLaMA
    from prepare_sft import prepare
    world = dict(model=os.path.join(work, "base"), tokenizer="gpt2",
                 task_table={task: dict(spec, block_size=32, batch_size=2) for task, spec in tasks.items()},
                 data={task: os.path.join(work, "data", task, "sft") for task in tasks})
    if os.path.isdir(world["model"]):  # made by an earlier --smoke into this work folder (the base comes last)
        return world
    rng, names = random.Random(0), ("ROMEO", "JULIET", "NURSE")

    def speakers():
        return dict(prompt=f"After {rng.choice(names)}:\ngood night\nSpeaker:\n", completion=rng.choice(names))

    def arithmetic():
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return dict(messages=[dict(role="user", content=f"{a} + {b}"),
                              dict(role="assistant", content=f"{a} + {b} = {a + b}. The answer is {a + b}.")])

    for task, make in (("speakers", speakers), ("arithmetic", arithmetic)):
        folder = os.path.join(work, "data", task)
        os.makedirs(folder, exist_ok=True)
        for split, n in (("train", 24), ("val", 6)):
            with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
                f.writelines(json.dumps(make()) + "\n" for _ in range(n))
        prepare(os.path.join(folder, "train.jsonl"), os.path.join(folder, "val.jsonl"), world["data"][task],
                block_size=32, overwrite=True)
    torch.manual_seed(0)
    shape = dict(vocab_size=50304, n_embd=32, n_layer=2, n_head=2, n_kv_head=1, block_size=256, intermediate_size=64)
    LLaMA(LLaMA.scratch_config(dict(shape, rope_theta=10000.0, dropout=0.0))).save_pretrained(world["model"])
    return world
