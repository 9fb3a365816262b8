"""Causal attention for both models, with an optional KV cache for decoding.

Without a cache, every new token re-runs the model over the whole sequence: O(T^2) work for T tokens.
With a cache, each attention layer keeps the keys and values it has already computed. The prompt runs once
("prefill"), then one token per step; that step's attention reads the cached K/V. Prompts of different lengths
decoded in one batch (model/generate.py's batch_generate) are left-padded: the cache then knows each row's padding,
which padded_mask hides from every query, and each slot's position within its own row.

Shapes: B batch, H query heads, H_kv key/value heads, T new positions, S = positions attended over, D head size.
"""
import torch
import torch.nn.functional as F
from tools.errors import UserError


class KVCache:
    """Preallocated keys/values for every layer: (n_layer, B, H_kv, max_len, D) each.

    `pos` is how many positions are filled. Each layer calls `update` with its new k, v (B, H_kv, T, D), in
    layer order; the last layer's update advances `pos` by T, so a model only reads `pos` (its first position).

    Left-padded rows (batch_generate: prompts of different lengths in one batch): row b's pad[b] slots from slot
    `start` on (after prompt tuning's virtual tokens) hold padding. Then `key_mask` (B, max_len) is False on them,
    and `positions` (B, max_len) numbers each slot by the real slots before it, so that a row's tokens get the
    positions (RoPE angles, learned embeddings) they would have alone. Without padding both are None.
    """

    def __init__(self, n_layer, batch_size, n_kv_head, max_len, head_dim, device, dtype, pad=None, start=0):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_layer, self.max_len = n_layer, max_len
        self.pos = 0
        self.key_mask, self.positions = padding_tables(pad, start, max_len, device)

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


class SlidingKVCache:
    """KVCache's interface (`pos`, update, key_mask, positions) for a model whose local (sliding-window) layers see
    only the last `window` positions, e.g. Gemma 3: the global layers share one KVCache (every slot); the local ones
    keep their last R = window slots (plus the longest padding: a row's padding may sit inside its window, between
    prompt tuning's virtual tokens and its prompt) in a ring allocated once, slot s at index s % R. Writing slot s
    overwrites slot s - R, which no query from s on sees. Gemma 3 270M at 32k: 15 of 18 layers keep 512 slots.

    A local layer's update returns the ring (a decoding step) or the ring's past and the T new slots (a prefill),
    not in slot order: `local_slots(T)` says which slot each of those keys holds, for the mask's columns.
    """

    def __init__(self, is_local, window, batch_size, n_kv_head, max_len, head_dim, device, dtype, pad=None, start=0):
        self.is_local, self.index, counts = list(is_local), {}, [0, 0]  # index: layer -> its number within its kind
        for layer, local in enumerate(self.is_local):
            self.index[layer], counts[local] = counts[local], counts[local] + 1
        self.full = KVCache(counts[False], batch_size, n_kv_head, max_len, head_dim, device, dtype, pad, start)
        self.key_mask, self.positions = self.full.key_mask, self.full.positions  # None, or (B, max_len) each
        self.size = min(max_len, window + (int(max(pad, default=0)) if pad is not None else 0))  # R
        shape = (counts[True], batch_size, n_kv_head, self.size, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_layer, self.max_len, self.pos = len(self.is_local), max_len, 0

    def local_slots(self, T):
        """(S',) the slot of each key a local layer's update with T new slots returns (S' <= R + T)."""
        R, device = self.size, self.k.device
        if T == 1:  # the ring after the write: index i holds the latest slot <= pos that is i mod R
            return self.pos - (self.pos - torch.arange(min(self.pos + 1, R), device=device)) % R
        last = self.pos - 1  # before the write: the latest slot <= pos - 1, then the T new ones
        past = last - (last - torch.arange(min(self.pos, R), device=device)) % R
        return torch.cat([past, torch.arange(self.pos, self.pos + T, device=device)])

    def update(self, layer, k, v):
        """Store this layer's new k, v (B, H_kv, T, D); return what its queries attend over: (B, H_kv, S', D)."""
        T, R = k.size(2), self.size
        if not self.is_local[layer]:
            keys, values = self.full.update(self.index[layer], k, v)  # (B, H_kv, pos + T, D)
        elif self.pos + T > self.max_len:
            raise UserError(f"KV cache is full: {self.pos} + {T} positions > max_len {self.max_len}")
        else:
            ring_k, ring_v = self.k[self.index[layer]], self.v[self.index[layer]]  # (B, H_kv, R, D) views
            if T == 1:  # decoding: write the new slot, attend over the ring (written entries only)
                ring_k[:, :, self.pos % R], ring_v[:, :, self.pos % R] = k[:, :, 0], v[:, :, 0]
                n = min(self.pos + 1, R)
                keys, values = ring_k[:, :, :n], ring_v[:, :, :n]  # (B, H_kv, n, D)
            else:  # several slots: the past first, then the new ones, of which the ring keeps the last R
                n = min(self.pos, R)
                keys = torch.cat([ring_k[:, :, :n].to(k.dtype), k], dim=2)  # (B, H_kv, n + T, D)
                values = torch.cat([ring_v[:, :, :n].to(v.dtype), v], dim=2)
                kept = range(max(0, T - R), T)  # the new slots pos + kept[0] .. pos + T - 1
                at = torch.arange(self.pos + kept.start, self.pos + T, device=k.device) % R
                ring_k[:, :, at], ring_v[:, :, at] = k[:, :, kept.start:], v[:, :, kept.start:]
        if layer == self.n_layer - 1:
            self.pos += T  # every layer has stored these T positions
        return keys, values


def padding_tables(pad, start, max_len, device):
    """(key_mask, positions), each (B, max_len), for rows whose pad[b] slots from `start` on are padding; (None, None)
    when pad is None. A padding slot's position is its last real slot's (0 at the start): its keys are never read."""
    if pad is None:
        return None, None
    slot = torch.arange(max_len, device=device)  # (max_len,)
    pad = torch.as_tensor(pad, device=device)[:, None]  # (B, 1)
    key_mask = (slot < start) | (slot >= start + pad)  # (B, max_len): False on the row's padding
    positions = (key_mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, max_len): real slots before this one
    return key_mask, positions


def padded_mask(kv_cache, T, window=None):
    """Which of the S = pos + T slots each of the T new queries of a padded cache sees: (B, 1, T, S) bool.

    Query slot q sees key slot j iff j <= q (causal) and j is not padding; a padding query sees itself too, so that
    its softmax has a key (its output is never read). window (a sliding-window layer): also positions[q] -
    positions[j] < window, counted in positions, since a row's padding does not count as distance.
    """
    past, S = kv_cache.pos, kv_cache.pos + T
    device = kv_cache.key_mask.device
    q = torch.arange(past, S, device=device)[:, None]  # (T, 1) query slots
    j = torch.arange(S, device=device)[None]  # (1, S) key slots
    seen = (j <= q) & (kv_cache.key_mask[:, None, :S] | (j == q))  # (B, T, S)
    if window is not None:
        positions = kv_cache.positions
        seen = seen & (positions[:, past:S, None] - positions[:, None, :S] < window)  # (B, T, S)
    return seen[:, None]  # (B, 1, T, S): broadcast over heads


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
    attn_mask (B, 1, T, S) bool replaces the plain causal mask: packed_causal_mask in training (no cache, S = T),
    or padded_mask over the cache's slots when its rows are left-padded (S = pos + T).
    """
    T = q.size(2)
    if attn_mask is not None:
        is_causal, mask = False, attn_mask
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)  # (B, H_kv, pos+T, D); the mask hides each row's padding
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
    # flash attention when the backend has it
    return attend(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal)


def attend(q, k, v, **sdpa_args):
    """F.scaled_dot_product_attention(q, k, v, **sdpa_args) with H_kv <= H key/value heads (grouped-query attention),
    each serving H // H_kv query heads. A decoding step (one query a row) lets SDPA share the heads itself
    (enable_gqa): repeating them would copy the whole cache every step. Otherwise K/V are repeated to H heads once,
    which every kernel takes (CUDA's memory-efficient kernel, the one a boolean mask selects, has no enable_gqa)."""
    if k.size(1) != q.size(1):
        if q.size(2) == 1:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **sdpa_args)  # (B, H, 1, D)
        repeat = q.size(1) // k.size(1)
        k = k.repeat_interleave(repeat, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(repeat, dim=1)
    return F.scaled_dot_product_attention(q, k, v, **sdpa_args)  # (B, H, T, D)
