"""What every model family shares: the methods train.py, checkpoints and sampling call, written once.

A family (model/gpt.py, model/llama.py) subclasses CausalLM and provides:
    model_type                  config.json's model_type, its key in model.MODELS ("gpt2", "llama")
    config_class                its config dataclass; CausalLM(config) builds the model
    scratch_config(settings)    that dataclass from train.py's settings (n_layer, n_embd, block_size, ...)
    forward(idx, targets=None, kv_cache=None) -> (logits, loss)
    max_seq_len, make_kv_cache(batch_size, max_len)
    from_pretrained(folder, dtype=None, dropout=...), save_pretrained(folder)
"""
from dataclasses import asdict

import torch.nn as nn

from .generate import generate
from .optim import configure_adamw


class CausalLM(nn.Module):
    model_type: str
    config_class: type
    CONV1D_NAMES = ()  # weights Hugging Face stores transposed, (in, out): GPT-2's Conv1D projections

    def num_params(self):
        """Parameters counted once (a tied lm_head/embedding matrix is one tensor)."""
        return sum(p.numel() for p in self.parameters())

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, use_cache=True,
                 generator=None):
        """idx (B, T) -> (B, T + new). Several samples of one prompt: repeat the prompt along B."""
        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, verbose=True):
        """AdamW (model/optim.py): decay on matrices and embeddings, not on norm gains or biases. Only parameters
        with requires_grad are handed over, so a LoRA model's frozen base stays out."""
        return configure_adamw(self, weight_decay, learning_rate, betas, device_type, verbose)

    def config_dict(self):
        """The config as a plain dict (checkpoints store it; config_class(**it) rebuilds the model)."""
        return asdict(self.config)
