"""Exact match on an SFT val split: does greedy decoding of each val prompt give the reference answer?

The prompt of a val example is everything before its last trained span (the completion, or the last assistant
reply), the reference is that span without its EOS. The model completes the prompt greedily until EOS; the
example counts as right when the decoded completion equals the reference, both stripped of surrounding whitespace.
sft_eval.py prints it for several models; train.py calls exact_match() every `eval_generate_every` steps, each
rank on its share of the prompts, the counts all-reduced.
"""
from collections import Counter

import torch
import torch.distributed as dist

from model.generate import batch_generate


def prompt_and_reference(ids, mask, eos_id):
    """(prompt ids, reference ids): split one example (numpy ids, bool mask) at its last trained span."""
    end = int(mask.nonzero()[0][-1]) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    reference = ids[start:end].tolist()
    if reference and reference[-1] == eos_id:
        reference = reference[:-1]
    return ids[:start].tolist(), reference


@torch.no_grad()
def exact_match(model, examples, tok, device, rank=0, world_size=1, limit=0, extra_tokens=8, batch_size=32):
    """(correct, n) over examples[:limit] (all when 0), rank r scoring every world_size-th one; summed over ranks.
    Prompts of any lengths are decoded together, batch_size at a time (batch_generate: left-padded, each row what it
    would be alone), longest first so that a batch's prompts have similar lengths (less padding). Each row keeps its
    own budget, len(reference) + extra_tokens new tokens, within the positions its batch's longest prompt leaves."""
    examples = examples[:limit or None][rank::world_size]
    was_training = model.training
    model.eval()
    pairs = [prompt_and_reference(ids, mask, tok.eos_id) for ids, mask in examples]
    pairs.sort(key=lambda pair: -len(pair[0]))
    correct = 0
    for i in range(0, len(pairs), batch_size):
        group = pairs[i:i + batch_size]
        room = model.max_seq_len - len(group[0][0])  # the longest prompt comes first
        budgets = [min(len(reference) + extra_tokens, room) for _, reference in group]
        out = batch_generate(model, [prompt for prompt, _ in group], max(budgets), temperature=0.0, eos_id=tok.eos_id)
        for row, budget, (_, reference) in zip(out, budgets, group):
            row = row[:budget]
            row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
            correct += tok.decode(row).strip() == tok.decode(reference).strip()
    model.train(was_training)
    counts = torch.tensor([correct, len(examples)], dtype=torch.long, device=device)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return tuple(counts.tolist())


def majority_baseline(train_examples, val_examples, tok):
    """(answer, correct, n): always answering the most frequent training answer."""
    def answer(example):
        return tok.decode(prompt_and_reference(*example, tok.eos_id)[1]).strip()
    most_common = Counter(map(answer, train_examples)).most_common(1)[0][0]
    return most_common, sum(answer(ex) == most_common for ex in val_examples), len(val_examples)
