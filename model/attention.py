"""Causal attention for both models, with an optional KV cache for decoding.

Without a cache, every new token re-runs the model over the whole sequence: O(T^2) work for T tokens.
With a cache, each attention layer keeps the keys and values it has already computed. The prompt runs once
("prefill"), then one token per step; that step's attention reads the cached K/V.

Shapes: B batch, H query heads, H_kv key/value heads, T new positions, S = positions attended over, D head size.
"""
import torch
import torch.nn.functional as F
from tools.errors import UserError


class KVCache:
    """Preallocated keys/values for every layer: (n_layer, B, H_kv, max_len, D) each.

    `pos` is how many positions are filled. Each layer calls `update` with its new k, v (B, H_kv, T, D), in
    layer order; the last layer's update advances `pos` by T, so a model only reads `pos` (its first position).
    """

    def __init__(self, n_layer, batch_size, n_kv_head, max_len, head_dim, device, dtype):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_layer, self.max_len = n_layer, max_len
        self.pos = 0

    def update(self, layer, k, v):
        """Store this layer's new k, v after the filled positions; return all of them: (B, H_kv, pos+T, D)."""
        T = k.size(2)
        if self.pos + T > self.max_len:
            raise UserError(f"KV cache is full: {self.pos} + {T} positions > max_len {self.max_len}")
        end = self.pos + T
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]
        if layer == self.n_layer - 1:
            self.pos = end  # every layer has stored these T positions
        return keys, values


def packed_causal_mask(position_ids):
    """Block-diagonal causal mask (B, 1, T, T) for rows that pack several examples: query i sees key j iff
    j <= i and both belong to the same example. An example starts wherever its position id is 0.

    On CPU SDPA runs this mask in its math kernel; on CUDA a boolean mask selects the memory-efficient kernel
    (flash attention takes no mask), which keeps O(T) memory but still computes the masked-out blocks.
    """
    doc = (position_ids == 0).cumsum(dim=1)  # (B, T): which example each position belongs to
    same_doc = doc[:, :, None] == doc[:, None, :]  # (B, T, T)
    T = position_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()  # (T, T)
    return (same_doc & causal)[:, None]  # (B, 1, T, T): broadcast over heads


def cached_attention(q, k, v, kv_cache, layer, dropout_p=0.0, attn_mask=None):
    """Causal softmax(q k^T / sqrt(D)) v, optionally through a KV cache. q (B, H, T, D); k, v (B, H_kv, T, D).

    Grouped-query attention: when H_kv < H, each K/V head serves H // H_kv query heads.
    attn_mask (B, 1, T, T) bool, e.g. packed_causal_mask: replaces the plain causal mask (training only).
    """
    T = q.size(2)
    if attn_mask is not None:
        if kv_cache is not None:
            raise UserError("attn_mask (packed examples) is for training; decoding with a KV cache is causal")
        is_causal, mask = False, attn_mask
    elif kv_cache is None or kv_cache.pos == 0:
        is_causal, mask = True, None  # plain causal attention over these T positions
        if kv_cache is not None:
            kv_cache.update(layer, k, v)
    else:
        k, v = kv_cache.update(layer, k, v)  # (B, H_kv, pos+T, D)
        past = k.size(2) - T
        if T == 1:
            is_causal, mask = False, None  # the newest token may see everything before it
        else:
            # query i sits at absolute position past+i and may see keys 0..past+i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)  # (T, S)
            is_causal = False
    if k.size(1) != q.size(1):
        repeat = q.size(1) // k.size(1)
        k = k.repeat_interleave(repeat, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(repeat, dim=1)
    # flash attention when the backend has it
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)
