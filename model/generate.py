"""Autoregressive sampling, shared by every model family (the KV cache itself is in model/attention.py).

Two entry points, one loop (decode):
    generate(model, idx, ...)              idx (B, T): prompts of one length; returns (B, T + new)
    batch_generate(model, prompts, ...)    a list of token-id lists of any lengths; returns their completions

batch_generate left-pads the prompts into one (B, T) batch. The KV cache knows each row's padding: the padding
keys are hidden from every query, and a row's tokens get the positions they would have alone (KVCache.positions),
so each row decodes as if it were alone in the batch. The cache is allocated once, for T + max_new_tokens slots;
every step writes one slot of it. The prefill computes the logits of the last position only (logits_to_keep=1):
a prompt's other T - 1 rows of (T, V) logits would be thrown away (V = 49k for SmolLM2, 262k for Gemma 3).

A model that supports this provides:
    model.max_seq_len                                   positions it can attend over
    model.make_kv_cache(batch_size, max_len, pad=None)  an empty KVCache; pad (B,): left padding per row
    model(idx, kv_cache=cache, logits_to_keep=1)        the last position's logits (B, 1, V), idx's K/V cached
"""
import torch
import torch.nn.functional as F
from tools.errors import UserError


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, vocab). temperature 0 means greedy (argmax).
    generator: one torch.Generator for the batch, or a list of one per row: then each row draws from its own only,
    so its token does not depend on which other rows are in the batch."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # keep the smallest set of tokens whose probabilities sum to >= top_p (nucleus sampling)
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already enough
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits.float(), dim=-1)
    if isinstance(generator, (list, tuple)):  # row b from generator[b]: (1, vocab) -> (1, 1) each
        return torch.cat([torch.multinomial(p[None], 1, generator=g) for p, g in zip(probs, generator)])  # (B, 1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def decode(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, generator=None,
           pad=None, on_token=None):
    """The new tokens (B, <= max_new_tokens) after idx (B, T), through a KV cache of T + max_new_tokens slots.
    pad (B,): how many of each row's first tokens are padding (None: none). Rows that emitted eos_id are
    continued with it; the loop stops when every row has."""
    B, T = idx.shape
    cache = model.make_kv_cache(B, T + max_new_tokens, pad=pad)
    new = torch.empty(B, max_new_tokens, dtype=torch.long, device=idx.device)
    done = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
    step_input = idx  # the prompt first (prefill), then one token a step
    for i in range(max_new_tokens):
        logits, _ = model(step_input, kv_cache=cache, logits_to_keep=1)  # (B, 1, V)
        next_token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
        if eos_id is not None:
            next_token = torch.where(done, eos_id, next_token)  # a finished row repeats eos
            done = done | (next_token == eos_id)
        new[:, i:i + 1] = next_token
        if on_token is not None:
            on_token(next_token)
        if eos_id is not None and bool(done.all()):
            return new[:, :i + 1]
        step_input = next_token
    return new


def check_length(model, T, max_new_tokens, hint):
    if T + max_new_tokens > model.max_seq_len:
        raise UserError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"{model.max_seq_len} positions; {hint}")


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
             use_cache=True, generator=None, on_token=None):
    """Extend idx (B, T) by up to max_new_tokens tokens. Rows that emitted eos_id are padded with it;
    generation stops early when every row has. For several samples of one prompt, repeat it in the batch.
    on_token(next_token (B, 1)) is called after every step, e.g. to stream the text as it is generated.
    use_cache=False re-runs the model over the last max_seq_len tokens every step (a sliding window)."""
    if use_cache:
        check_length(model, idx.size(1), max_new_tokens, "shorten one, or pass use_cache=False to slide the window")
        new = decode(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, on_token=on_token)
        return torch.cat([idx, new], dim=1)
    done = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.max_seq_len:], logits_to_keep=1)  # (B, 1, V)
        next_token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
        if eos_id is not None:
            next_token = torch.where(done, eos_id, next_token)
            done = done | (next_token == eos_id)
        idx = torch.cat([idx, next_token], dim=1)
        if on_token is not None:
            on_token(next_token)
        if eos_id is not None and bool(done.all()):
            break
    return idx


@torch.no_grad()
def batch_generate(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
                   generator=None):
    """Completions of prompts (a list of token-id lists, of any lengths), decoded together in one batch.

    Each completion is a list of token ids: up to and including its first eos_id, else max_new_tokens long.
    Each row decodes as it would alone: greedy (temperature 0) gives what generate() gives for that prompt alone.
    generator: one torch.Generator, or a list of one per prompt, from which that prompt's draws alone come: a
    prompt's sampled completion then does not depend on what else is in the batch (one process decoding a batch
    equals two decoding its halves).
    """
    if not prompts:
        return []
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise UserError(f"batch_generate: prompt {lengths.index(0)} is empty; every prompt needs a token to start")
    if isinstance(generator, (list, tuple)) and len(generator) != len(prompts):
        raise UserError(f"batch_generate: {len(generator)} generators for {len(prompts)} prompts; give one per prompt")
    T = max(lengths)
    check_length(model, T, max_new_tokens, "shorten the longest prompt or max_new_tokens")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    # left padding: every row's last prompt token sits at T - 1, where the first new token is predicted from.
    # The pad id is any valid token: the cache hides its keys, and no query of a real token reads them.
    idx = torch.tensor([[0] * (T - n) + list(p) for p, n in zip(prompts, lengths)], dtype=torch.long, device=device)
    pad = torch.tensor([T - n for n in lengths], device=device) if min(lengths) < T else None  # (B,); None: none
    new = decode(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id, generator, pad=pad).tolist()
    return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in new]
