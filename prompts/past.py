"""How virtual positions enter the model: as keys/values in the attention's cache, before the real tokens.

Prompt tuning, P-tuning and prefix tuning all put n learned positions in front of every sequence. The models
(model/gpt.py, model/llama.py) see them through the cache they already use for decoding: before the first real
token, `model.prompt_encoder.prefill(model, B, kv_cache)` fills positions 0..n-1, and the real tokens then run
at positions n..n+T-1, attending to those n positions as to any past (model/attention.py's cached_attention).
  - prompt tuning / P-tuning learn n input *embeddings*: run them through the model once (inputs_embeds), and
    every layer stores their keys/values. Causal attention makes this exactly the same as concatenating them in
    front of the tokens (PEFT's way): a virtual token never sees a real one.
  - prefix tuning learns the keys/values of every layer directly: they are written into the cache as they are.

Training needs gradients through the cache, so a forward without a KV cache gets a PastCache: the keys/values
of each layer concatenated, not written into a preallocated buffer. Generation uses the KVCache as usual.
"""
import torch


class PastCache:
    """Keys/values per layer, grown by concatenation: differentiable. The interface of model.attention.KVCache:
    `pos` positions filled (advanced by the last layer's update) and `update(layer, k, v)` -> all k, v so far."""
    key_mask = None  # no left-padded rows (only batch_generate's KVCache has them)

    def __init__(self, n_layer):
        self.k, self.v = [None] * n_layer, [None] * n_layer
        self.n_layer, self.pos = n_layer, 0

    def update(self, layer, k, v):
        if self.k[layer] is not None:
            # a learned prefix is fp32; under autocast the new k, v are bf16: the past takes their dtype
            k = torch.cat([self.k[layer].to(k.dtype), k], dim=2)  # (B, H_kv, pos + T, D)
            v = torch.cat([self.v[layer].to(v.dtype), v], dim=2)
        self.k[layer], self.v[layer] = k, v
        if layer == self.n_layer - 1:
            self.pos = k.size(2)
        return k, v


def start_cache(model, kv_cache):
    """The cache the virtual positions go into; None when the sequence has already started (pos > 0)."""
    if kv_cache is None:
        return PastCache(model.config.n_layer)
    return kv_cache if kv_cache.pos == 0 else None


def prefill_embeddings(model, embeds, batch_size, kv_cache):
    """Prompt tuning / P-tuning: run the virtual token embeddings (n, C) through the model into the cache."""
    cache = start_cache(model, kv_cache)
    if cache is None:
        return kv_cache
    model(None, kv_cache=cache, inputs_embeds=embeds.expand(batch_size, -1, -1), logits_to_keep=1)  # logits unused
    return cache


def prefill_keys_values(model, keys_values, kv_cache):
    """Prefix tuning: write each layer's keys/values (B, H_kv, n, D) into the cache, as if n tokens had run."""
    cache = start_cache(model, kv_cache)
    if cache is None:
        return kv_cache
    for layer, (k, v) in enumerate(keys_values):
        cache.update(layer, k, v)
    return cache
