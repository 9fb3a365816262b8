"""What every model family shares: the methods train.py, checkpoints and sampling call, written once.

A family (model/gpt.py, model/llama.py) subclasses CausalLM and provides:
    model_type                  config.json's model_type, its key in model.MODELS ("gpt2", "llama")
    config_class                its config dataclass; CausalLM(config) builds the model
    scratch_config(settings)    that dataclass from train.py's settings (n_layer, n_embd, block_size, ...)
    forward(idx, targets=None, kv_cache=None, position_ids=None, inputs_embeds=None, logits_to_keep=0)
        -> (logits, loss); with a `prompt_encoder` (prompts/), its prefill(model, B, kv_cache) runs first, and
        max_seq_len / make_kv_cache count its positions; a cache with left-padded rows gives each row its positions
    max_seq_len, make_kv_cache(batch_size, max_len, pad=None)
    from_pretrained(folder, dtype=None, dropout=...), save_pretrained(folder)
and its forward runs each block through run_block and ends with head_and_loss, which own three memory settings:
    loss_chunk_size             tokens per chunk of the training loss (model/chunked_loss.py); 0: full logits;
                                a head that is not one weight (head_weight below) takes the full-logits path
    loss_recompute              False (default): the loss forms its gradients in forward, while it has the logits;
                                True: it recomputes the logits in backward (2 N V C more FLOPs, the same peak)
    activation_checkpointing    recompute each block in backward instead of keeping its activations
"""
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .chunked_loss import DEFAULT_CHUNK_SIZE, linear_cross_entropy
from .generate import generate


def head_weight(head):
    """The (V, C) weight W that `head` computes x W^T with, for the chunked loss; None when its output is not that
    (a bias, an unknown module, or its own answer None): then head_and_loss runs the head itself (full logits).

    The protocol, so that model/ knows nothing of what wraps the head: a module with `effective_weight()` returns
    the weight it multiplies by, differentiable in whatever trains, or None when no single weight gives its output.
    A LoRA head (lora/layer.py) returns W + s B A (DoRA: g (W + s B A)): the chunked loss forms its gradient
    dW' (V, C), one weight-sized tensor as for a head that trains fully, and autograd takes it on to
    dA = s B^T dW' and dB = s dW' A^T; with LoRA dropout in training it returns None (dropout(x) reaches the
    adapter, x the base: no one W'). A quantized head returns its dequantized weight; an nn.Linear its weight."""
    if getattr(head, "bias", None) is not None:
        return None
    if hasattr(head, "effective_weight"):
        return head.effective_weight()
    return head.weight if isinstance(head, nn.Linear) else None


def next_token_loss(logits, targets):
    """Mean cross-entropy of logits (B, T, V) against targets (B, T), skipping targets of -1; None without
    targets. In float32 even under bf16 autocast: a softmax over 50k logits needs the precision."""
    if targets is None:
        return None
    return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


class CausalLM(nn.Module):
    model_type: str
    config_class: type
    CONV1D_NAMES = ()  # weights Hugging Face stores transposed, (in, out): GPT-2's Conv1D projections
    loss_chunk_size = DEFAULT_CHUNK_SIZE  # run-time settings, not architecture: set them on the model
    loss_recompute = False  # the loss forms its gradients in forward; True: recomputes its logits in backward
    activation_checkpointing = False

    def run_block(self, block, x, *args):
        """block(x, *args). With activation_checkpointing in training, the block keeps only its input x for backward
        and runs its forward again there (torch.utils.checkpoint; use_reentrant=False so that inputs which do not
        require grad, LoRA's frozen path, still get gradients; the RNG state is restored, so dropout repeats)."""
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, x, *args, use_reentrant=False)
        return block(x, *args)

    def head_and_loss(self, x, targets, logits_to_keep=0):
        """(logits, loss) from the final hidden states x (B, T, C). Without targets: (lm_head(x), None), or with
        logits_to_keep n > 0 the last n positions' only, (B, n, V): a prefill of T tokens needs 1 of T rows. With
        targets: (None, mean loss over targets != -1) from the chunked linear + cross-entropy on the head's weight
        (head_weight: a LoRA head's W + s B A), which never forms the (B, T, V) logits; loss_chunk_size = 0, or a
        head that is not one weight, takes the plain path instead (full logits, then F.cross_entropy)."""
        weight = head_weight(self.lm_head) if targets is not None and self.loss_chunk_size > 0 else None
        if targets is None and logits_to_keep > 0:
            x = x[:, -logits_to_keep:]  # (B, n, C)
        if weight is None:
            logits = self.lm_head(x)  # (B, T, V)
            return logits, next_token_loss(logits, targets)
        return None, linear_cross_entropy(x, weight, targets, self.loss_chunk_size, recompute=self.loss_recompute)

    def num_params(self):
        """Parameters counted once (a tied lm_head/embedding matrix is one tensor)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def num_virtual_tokens(self):
        """Positions that prompt/prefix tuning (prompts/) put before every sequence; 0 without one."""
        encoder = getattr(self, "prompt_encoder", None)
        return encoder.num_virtual_tokens if encoder is not None else 0

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, use_cache=True,
                 generator=None):
        """idx (B, T) -> (B, T + new). Several samples of one prompt: repeat the prompt along B."""
        return generate(self, idx, max_new_tokens, temperature, top_k, top_p, eos_id, use_cache, generator)

    def architecture_state_dict(self):
        """The state dict of the architecture alone, as Hugging Face saves it: whatever was attached to the model
        (an adapter's tensors, a prompt encoder) has keys the architecture does not have, and is left out."""
        with torch.device("meta"):
            own = set(type(self)(self.config).state_dict())  # no memory: the names only
        return {k: v for k, v in self.state_dict().items() if k in own}

    def config_dict(self):
        """The config as a plain dict (checkpoints store it; config_class(**it) rebuilds the model)."""
        return asdict(self.config)
