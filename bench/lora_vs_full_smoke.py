"""bench/lora_vs_full.py --smoke: the whole bench in seconds, on a world made here (what the tests run)."""
import json
import os


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
