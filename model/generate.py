"""Autoregressive sampling, shared by GPT and LLaMA (the KV cache itself is in model/attention.py).

A model that supports this provides:
    model.max_seq_len                            positions it can attend over
    model.make_kv_cache(batch_size, max_len)     an empty KVCache
    model(idx, kv_cache=cache)                   logits for idx (B, T), appending its K/V to the cache
"""
import torch
import torch.nn.functional as F
from tools.errors import UserError


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row from logits (B, vocab). temperature 0 means greedy (argmax)."""
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
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None,
             use_cache=True, generator=None, on_token=None):
    """Extend idx (B, T) by up to max_new_tokens tokens. Rows that emitted eos_id are padded with it;
    generation stops early when every row has. For several samples of one prompt, repeat it in the batch.
    on_token(next_token (B, 1)) is called after every step, e.g. to stream the text as it is generated."""
    B, T = idx.shape
    if use_cache:
        if T + max_new_tokens > model.max_seq_len:
            raise UserError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                             f"{model.max_seq_len} positions; shorten one, or pass use_cache=False to slide the window")
        cache = model.make_kv_cache(B, T + max_new_tokens)
    done = torch.zeros(B, 1, dtype=torch.bool, device=idx.device)
    step_input = idx
    for _ in range(max_new_tokens):
        if use_cache:
            logits, _ = model(step_input, kv_cache=cache)  # prefill: (B, T, V); then (B, 1, V)
        else:
            logits, _ = model(idx[:, -model.max_seq_len:])
        next_token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
        if eos_id is not None:
            next_token = torch.where(done, torch.full_like(next_token, eos_id), next_token)
            done = done | (next_token == eos_id)
        idx = torch.cat([idx, next_token], dim=1)
        if on_token is not None:
            on_token(next_token)
        step_input = next_token
        if eos_id is not None and bool(done.all()):
            break
    return idx
