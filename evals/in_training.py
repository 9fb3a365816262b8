"""The evaluations train.py runs between steps besides the objective's own: samples of text, and HellaSwag.

Samples come from a generator of their own (seeded by seed + step): sampling never shifts the training RNG, so a
resumed run stays identical to an uninterrupted one. HellaSwag is scored on every rank, each its stride of the
examples, the counts all-reduced (evals/hellaswag.py).
"""
from functools import partial

import torch
import torch.distributed as dist


@torch.no_grad()
def sample_texts(model, tokenizer, prompt, num_samples, max_new_tokens, seed, device, autocast):
    """num_samples continuations (top-k 50, temperature 1) of `prompt`, decoded."""
    model.eval()
    idx = torch.tensor(tokenizer.encode(prompt), dtype=torch.long, device=device).repeat(num_samples, 1)
    generator = torch.Generator(device=device).manual_seed(seed)
    new_tokens = min(max_new_tokens, model.max_seq_len - idx.size(1))  # the KV cache holds max_seq_len
    with autocast:
        out = model.generate(idx, new_tokens, temperature=1.0, top_k=50, eos_id=tokenizer.eos_id,
                             generator=generator)
    model.train()
    return [tokenizer.decode(row.tolist()) for row in out]


def hellaswag_accuracy(model, tokenizer, device, rank=0, world_size=1, limit=0, amp=False):
    """{'acc', 'acc_norm', ...} on the val split (downloaded once, by rank 0, to data/hellaswag)."""
    from evals import hellaswag
    if rank == 0:
        hellaswag.download("val", "data/hellaswag")  # once, before any rank reads it
    if dist.is_initialized():
        dist.barrier()
    path = hellaswag.download("val", "data/hellaswag")  # now cached: every rank just gets the path
    examples = hellaswag.load_examples(path, limit=limit or None)
    encode = partial(tokenizer.encode, add_special_tokens=False)  # context and endings are encoded apart: no BOS
    return hellaswag.evaluate(model, examples, device, encode, rank=rank, world_size=world_size, amp=amp)
