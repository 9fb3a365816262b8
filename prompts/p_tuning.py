"""P-tuning (Liu et al., 2021): soft prompt tokens produced by a small trainable encoder, PEFT's PromptEncoder.

Like prompt tuning, n virtual token embeddings go in front of every sequence, but they are not trained directly:
a table E (n, C) passes through an encoder, and its output is the prompt. The reparameterisation couples the n
tokens (the LSTM sees them in order; the MLP shares its weights across them), which Liu et al. find trains faster
and more stably than free embeddings.

    MLP  (PEFT's default):  prompt = W3 relu(W2 relu(W1 E + b1) + b2) + b3      C -> h -> h -> C
    LSTM:                   prompt = W5 relu(W4 biLSTM(E) + b4) + b5          C -> 2h (bidirectional) -> 2h -> C

h = encoder_hidden_size (default C). After training only the output matters: PEFT saves the encoder's output
(n, C) as `prompt_embeddings`, and a loaded adapter is that table alone (inference_mode: no encoder).
"""
import torch.nn as nn

from prompts.past import prefill_embeddings
from tools.errors import UserError

ENCODER_TYPES = ("MLP", "LSTM")


class PromptEncoder(nn.Module):
    def __init__(self, num_virtual_tokens, token_dim, hidden_size=None, encoder_type="MLP", num_layers=2,
                 dropout=0.0, inference_mode=False):
        super().__init__()
        h = hidden_size or token_dim
        self.num_virtual_tokens, self.encoder_type = num_virtual_tokens, encoder_type
        self.inference_mode = inference_mode
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)  # (n, C): E
        if inference_mode:
            return  # the embedding holds the encoder's output: nothing else to compute
        if encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(token_dim, h, num_layers=num_layers, dropout=dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, token_dim))
        elif encoder_type == "MLP":  # always three layers, whatever num_layers says (as PEFT)
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(),
                                          nn.Linear(h, token_dim))
        else:
            raise UserError(f"P-tuning encoder_type {encoder_type!r}: use one of {ENCODER_TYPES}")

    def forward(self):
        E = self.embedding.weight  # (n, C)
        if self.inference_mode:
            return E
        if self.encoder_type == "LSTM":
            return self.mlp_head(self.lstm_head(E[None])[0])[0]  # (1, n, 2h) -> (n, C)
        return self.mlp_head(E)  # (n, C)

    def prefill(self, model, batch_size, kv_cache):
        return prefill_embeddings(model, self(), batch_size, kv_cache)

    def saved_embeddings(self):
        return self().detach()  # (n, C): the encoder's output

    def describe(self):
        head = "table" if self.inference_mode else self.encoder_type
        return f"PTuning({self.num_virtual_tokens} virtual tokens x {self.embedding.embedding_dim}, {head})"
