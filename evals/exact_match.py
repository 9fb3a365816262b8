"""Exact match on an SFT val split: does greedy decoding of each val prompt give the reference answer?

The prompt of a val example is everything before its last trained span (the completion, or the last assistant
reply), the reference is that span without its EOS. The model completes the prompt greedily until EOS, and MATCHES
says what of the completion must equal the reference's:

    exact    the whole answer, stripped of surrounding whitespace
    numeric  its last number (objectives/rewards.py's last_number: 1,234 = 1234, 0.50 = 0.5); a text without a
             number matches nothing. Worked answers ("40 + 30 = 70. ... The answer is 85.") are scored by the result

sft_eval.py prints it for several models; train.py calls exact_match() every `eval_generate_every` steps, each
rank on its share of the prompts, the counts all-reduced, and logs it as log_key(eval_generate_match).
"""
from collections import Counter

import torch
import torch.distributed as dist

from model.generate import batch_generate
from objectives.rewards import last_number


def number_of(text):
    """The last number of text, written canonically (str of a Fraction: '85', '1/2'), or None."""
    number = last_number(text)
    return None if number is None else str(number)


MATCHES = {  # eval_generate_match -> what of an answer is compared (None: nothing to compare, never a match)
    "exact": str.strip,
    "numeric": number_of,
}


def is_match(match, completion, reference):
    """Does the completion's part that MATCHES[match] compares equal the reference's?"""
    key = MATCHES[match](reference)
    return key is not None and MATCHES[match](completion) == key


def log_key(match):
    """The name of the score in log.jsonl: val_exact_match, val_numeric_match."""
    return f"val_{match}_match"


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
def exact_match(model, examples, tok, device, rank=0, world_size=1, limit=0, extra_tokens=8, batch_size=32,
                match="exact"):
    """(correct, n) over examples[:limit] (all when 0), rank r scoring every world_size-th one; summed over ranks;
    a completion is right when is_match(match, completion, reference).
    Prompts of any lengths are decoded together, batch_size at a time (batch_generate: left-padded, each row what it
    would be alone), longest first so that a batch's prompts have similar lengths (less padding). Each row keeps its
    own budget, len(reference) + extra_tokens new tokens, within the positions its batch's longest prompt leaves
    (enough for a worked answer of the reference's shape, whose last number is what 'numeric' reads)."""
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
            correct += is_match(match, tok.decode(row), tok.decode(reference))
    model.train(was_training)
    counts = torch.tensor([correct, len(examples)], dtype=torch.long, device=device)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return tuple(counts.tolist())


def majority_baseline(train_examples, val_examples, tok, match="exact"):
    """(answer, correct, n): always answering the most frequent training answer (of what MATCHES[match] compares:
    the stripped text, or the last number)."""
    def answer(example):
        return MATCHES[match](tok.decode(prompt_and_reference(*example, tok.eos_id)[1]))
    most_common = Counter(map(answer, train_examples)).most_common(1)[0][0]
    correct = sum(most_common is not None and answer(ex) == most_common for ex in val_examples)
    return most_common, correct, len(val_examples)
