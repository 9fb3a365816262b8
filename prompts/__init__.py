"""Prompt-based PEFT: n learned positions in front of every sequence, the frozen model unchanged.

    prompt_tuning.py   prompt tuning: n input embeddings, trained directly           (PEFT's PROMPT_TUNING)
    p_tuning.py        P-tuning: n input embeddings produced by an MLP or LSTM         (PEFT's P_TUNING)
    prefix_tuning.py   prefix tuning: n keys/values per layer, optionally via an MLP   (PEFT's PREFIX_TUNING)
    past.py            how the positions reach the model: through its KV cache
    adapter.py         PEFT's file format, both ways

    from prompts import PromptConfig, apply_prompt
    apply_prompt(model, PromptConfig(method="prefix", num_virtual_tokens=20))
    print_trainable_parameters(model)  # only model.prompt_encoder trains
"""
from dataclasses import dataclass, replace

import torch.nn as nn

from prompts.p_tuning import ENCODER_TYPES, PromptEncoder
from prompts.prefix_tuning import PrefixEncoder
from prompts.prompt_tuning import PromptEmbedding
from tools.errors import UserError

METHODS = ("prompt", "ptuning", "prefix")
INITS = {"prompt": ("random", "sample_vocab", "text"), "ptuning": ("random",), "prefix": ("random", "zero")}


@dataclass
class PromptConfig:
    method: str = "prompt"  # 'prompt' | 'ptuning' | 'prefix'
    num_virtual_tokens: int = 20
    init: str = "random"  # prompt: 'random' | 'sample_vocab' | 'text';  prefix: 'random' | 'zero'
    init_text: str = ""  # prompt with init='text': the text whose token embeddings start the prompt
    encoder_type: str = "MLP"  # ptuning: 'MLP' | 'LSTM'
    encoder_hidden_size: int = 0  # ptuning, and prefix with projection: 0 means the token width
    encoder_num_layers: int = 2  # ptuning LSTM layers
    encoder_dropout: float = 0.0  # ptuning LSTM dropout
    prefix_projection: bool = False  # prefix: produce the keys/values with an MLP

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"PromptConfig.method {self.method!r}: use one of {METHODS}")
        if not (isinstance(self.num_virtual_tokens, int) and self.num_virtual_tokens > 0):
            raise UserError(f"PromptConfig.num_virtual_tokens must be a positive int, got {self.num_virtual_tokens!r}")
        if self.init not in INITS[self.method]:
            raise UserError(f"PromptConfig.init {self.init!r} for {self.method}: use one of {INITS[self.method]}")
        if self.init == "text" and not self.init_text:
            raise UserError("PromptConfig.init='text' needs init_text, the words whose embeddings start the prompt")
        if self.encoder_type not in ENCODER_TYPES:
            raise UserError(f"PromptConfig.encoder_type {self.encoder_type!r}: use one of {ENCODER_TYPES}")


def model_dims(model):
    """(n_layer, n_embd, n_kv_head, head_dim) of any of our model families."""
    c = model.config
    n_kv_head = getattr(c, "n_kv_head", None) or c.n_head
    return c.n_layer, c.n_embd, n_kv_head, getattr(c, "head_dim", None) or c.n_embd // c.n_head


def word_embeddings(model):
    for name in ("transformer.wte", "model.embed_tokens"):  # GPT; LLaMA and Gemma
        try:
            return model.get_submodule(name)
        except AttributeError:
            continue
    raise UserError(f"{type(model).__name__} has no token embedding (transformer.wte or model.embed_tokens)")


def build_encoder(model, config, encode=None, inference_mode=False):
    n_layer, n_embd, n_kv_head, head_dim = model_dims(model)
    n, hidden = config.num_virtual_tokens, config.encoder_hidden_size or None
    if config.method == "prompt":
        ids = encode(config.init_text) if config.init == "text" else None
        if config.init == "text" and not ids:
            raise UserError(f"PromptConfig.init_text {config.init_text!r} encodes to no tokens")
        init = "random" if inference_mode else config.init
        return PromptEmbedding(n, n_embd, init, word_embeddings(model), ids, embed=getattr(model, "embed", None))
    if config.method == "ptuning":
        return PromptEncoder(n, n_embd, hidden, config.encoder_type, config.encoder_num_layers, config.encoder_dropout,
                             inference_mode)
    return PrefixEncoder(n, n_layer, n_kv_head, head_dim, config.prefix_projection, hidden, config.init, inference_mode)


def apply_prompt(model: nn.Module, config: PromptConfig, encode=None, inference_mode=False) -> nn.Module:
    """Attach `model.prompt_encoder` and freeze everything else, in place; returns the model. encode: text -> token
    ids, for init='text'. inference_mode: the encoder is only its output table (a loaded adapter)."""
    if hasattr(model, "prompt_encoder"):
        raise UserError(f"{type(model).__name__} already has a prompt encoder; apply_prompt once")
    if config.method == "prompt" and config.init == "text" and encode is None:
        raise UserError("apply_prompt: init='text' needs encode, the tokenizer's text -> ids function")
    if model.max_seq_len <= config.num_virtual_tokens:
        raise UserError(f"num_virtual_tokens {config.num_virtual_tokens} leaves no positions of the model's "
                         f"{model.max_seq_len} for tokens")
    for p in model.parameters():
        p.requires_grad_(False)
    weight = next(model.parameters())
    model.prompt_encoder = build_encoder(model, config, encode, inference_mode).to(weight.device)
    model.prompt_config = replace(config)
    return model


def remove_prompt(model: nn.Module) -> nn.Module:
    """Drop the prompt encoder: the base model again (its parameters stay frozen)."""
    del model.prompt_encoder
    del model.prompt_config
    return model


from prompts.adapter import load_prompt_adapter, save_prompt_adapter  # noqa: E402  (adapter.py uses the above)

__all__ = ["PromptConfig", "apply_prompt", "remove_prompt", "save_prompt_adapter", "load_prompt_adapter", "METHODS",
           "PromptEmbedding", "PromptEncoder", "PrefixEncoder"]
