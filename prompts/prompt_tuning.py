"""Prompt tuning (Lester et al., 2021): learn n input embeddings, "soft prompt" tokens, in front of every sequence.

The model stays frozen; only the table P (n, C) trains: n * C numbers (20 x 768 = 15,360 for GPT-2 124M, 0.012%).
The model reads [P; embed(x)] and predicts as usual, so the prompt steers it the way a written instruction would,
except that its vectors need not be embeddings of real words. Lester et al. find that this matches full fine-tuning
only at large scale (10B+ parameters) and that initialising P from real token embeddings helps small models.

Init (PEFT's prompt_tuning_init): 'random' keeps nn.Embedding's N(0, 1); 'sample_vocab' copies the embeddings of
n random vocabulary tokens; 'text' copies those of init_text's tokens, repeated or cut to n.
In PEFT's file format the table is saved as `prompt_embeddings` (n, C).
"""
import math

import torch
import torch.nn as nn

from prompts.past import prefill_embeddings


class PromptEmbedding(nn.Module):
    def __init__(self, num_virtual_tokens, token_dim, init="random", word_embeddings=None, init_token_ids=None,
                 embed=None):
        """embed: the model's ids -> input embeddings where they are more than the table's rows (Gemma scales
        them by sqrt(C)); the sampled or text init starts from what the model itself feeds its first block."""
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)  # (n, C): the soft prompt
        if init == "sample_vocab":
            init_token_ids = torch.randint(0, word_embeddings.num_embeddings, (num_virtual_tokens,))
        elif init == "text":
            repeats = math.ceil(num_virtual_tokens / len(init_token_ids))
            init_token_ids = torch.tensor((list(init_token_ids) * repeats)[:num_virtual_tokens])
        if init in ("sample_vocab", "text"):
            with torch.no_grad():
                ids = init_token_ids.to(word_embeddings.weight.device)
                self.embedding.weight.copy_(embed(ids) if embed is not None else word_embeddings.weight[ids])

    def forward(self):
        return self.embedding.weight  # (n, C)

    def prefill(self, model, batch_size, kv_cache):
        return prefill_embeddings(model, self(), batch_size, kv_cache)

    def saved_embeddings(self):
        return self().detach()  # (n, C)

    def describe(self):
        return f"PromptTuning({self.num_virtual_tokens} virtual tokens x {self.embedding.embedding_dim})"
