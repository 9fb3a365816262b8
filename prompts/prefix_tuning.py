"""Prefix tuning (Li & Liang, 2021): learned keys and values, n of them, in front of every layer's attention.

Prompt tuning only touches the input; a prefix reaches every layer. For each layer l the model attends over
[P_k^l; K] and [P_v^l; V] instead of K and V, where P_k^l, P_v^l (H_kv, n, D) are trained and everything else is
frozen: L * 2 * n * H_kv * D numbers. The prefix is exactly a KV cache of n past positions, so the models need no
new attention code: the prefix is written into the cache and the tokens run at positions n.. (as in PEFT).

PEFT's PrefixEncoder, whose layout we keep: one table (n, L * 2 * H_kv * D), row t holding position t's key and
value for every layer, viewed as (n, 2L, H_kv, D): entry 2l is layer l's key, 2l + 1 its value.
prefix_projection=True reparameterises it, as Li & Liang did for stable training: a table (n, H_kv * D) through an
MLP, Linear(H_kv D -> h), tanh, Linear(h -> L * 2 * H_kv * D). Saved adapters keep only the output table.
"""
import torch.nn as nn

from prompts.past import prefill_keys_values


class PrefixEncoder(nn.Module):
    def __init__(self, num_virtual_tokens, n_layer, n_kv_head, head_dim, projection=False, hidden_size=None,
                 init="random", inference_mode=False):
        super().__init__()
        token_dim = n_kv_head * head_dim  # PEFT's token_dim for a prefix: the width of one layer's keys
        self.num_virtual_tokens, self.n_layer = num_virtual_tokens, n_layer
        self.n_kv_head, self.head_dim = n_kv_head, head_dim
        self.projection = projection and not inference_mode
        if self.projection:
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)  # (n, H_kv D)
            h = hidden_size or token_dim
            self.transform = nn.Sequential(nn.Linear(token_dim, h), nn.Tanh(), nn.Linear(h, n_layer * 2 * token_dim))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, n_layer * 2 * token_dim)  # (n, L 2 H_kv D)
        if init == "zero":  # PEFT's init_weights='zero': keys and values start at 0
            nn.init.zeros_(self.transform[-1].weight if self.projection else self.embedding.weight)
            if self.projection:
                nn.init.zeros_(self.transform[-1].bias)

    def forward(self):
        table = self.embedding.weight  # (n, L 2 H_kv D), or (n, H_kv D) before the projection
        return self.transform(table) if self.projection else table  # (n, L 2 H_kv D)

    def keys_values(self, batch_size):
        """[(k, v)] per layer, each (B, H_kv, n, D): views of one table, expanded over the batch."""
        n, H, D = self.num_virtual_tokens, self.n_kv_head, self.head_dim
        past = self().view(n, 2 * self.n_layer, H, D).permute(1, 2, 0, 3)  # (2L, H_kv, n, D)
        past = past.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # (2L, B, H_kv, n, D)
        return [(past[2 * layer], past[2 * layer + 1]) for layer in range(self.n_layer)]

    def prefill(self, model, batch_size, kv_cache):
        return prefill_keys_values(model, self.keys_values(batch_size), kv_cache)

    def saved_embeddings(self):
        return self().detach()  # (n, L 2 H_kv D)

    def describe(self):
        how = f", projection {self.transform[0].out_features}" if self.projection else ""
        return (f"Prefix({self.num_virtual_tokens} positions x {self.n_layer} layers x {self.n_kv_head} kv heads x "
                f"{self.head_dim}{how})")
