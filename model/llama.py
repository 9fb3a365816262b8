"""LLaMA (1, 2, 3), written out by hand, with Hugging Face's module names (LlamaForCausalLM).

It is GPT-2 (model/gpt.py) with five changes, each a small module below:
  - RMSNorm instead of LayerNorm: x / sqrt(mean(x^2) + eps) * weight. No mean subtraction, no bias; cheaper,
    and works as well. Computed in float32 and cast back, as Hugging Face does, so bf16 runs match it.
  - RoPE instead of learned position embeddings: no position table is added to x. Instead q and k are rotated,
    pair of channels by pair of channels, by an angle proportional to their position, so q . k depends only on
    the distance between the two tokens. v is not rotated.
  - SwiGLU MLP: down(silu(gate(x)) * up(x)), three matrices (C -> F, C -> F, F -> C) instead of GPT-2's two;
    F = intermediate_size is ~8/3 C rather than 4 C, keeping the parameter count about the same.
  - Grouped-query attention: only H_kv <= H heads of keys and values, each shared by H // H_kv query heads.
    The KV cache, which dominates decoding memory, shrinks by H / H_kv (Llama 3 8B: 32 / 8 = 4x).
  - No biases anywhere, and lm_head is its own matrix (tied to the embedding only in small models, e.g.
    Llama 3.2 1B: `tie_word_embeddings`). Hugging Face's attention_bias / mlp_bias flags are supported.

Shapes: B batch, T sequence length, C = n_embd, H = n_head, H_kv = n_kv_head, D = head_dim (C // H unless the
checkpoint says otherwise), F = intermediate_size, V = vocab_size.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import KVCache, cached_attention, packed_causal_mask, padded_mask
from .gpt import init_weights
from .hf import check_keys, load_hf_config, load_hf_state_dict, resolve_model_dir, save_hf_folder
from .lm import CausalLM
from .modules import project
from tools.errors import UserError

LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class LLaMAConfig:
    vocab_size: int = 32000
    n_embd: int = 4096  # Hugging Face's hidden_size
    intermediate_size: int = 11008
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None  # None: n_head; fewer: grouped-query attention
    head_dim: int | None = None  # None: n_embd // n_head (None fields are filled in by __post_init__)
    rope_theta: float = 10000.0  # RoPE base: Llama 2 10k, Llama 3 500k (longer wavelengths, longer contexts)
    rope_scaling: dict | None = None  # None, or Llama 3.1's {"rope_type": "llama3", factor, low/high_freq_factor, ...}
    rms_norm_eps: float = 1e-6
    max_seq_len: int = 2048  # Hugging Face's max_position_embeddings
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    dropout: float = 0.0  # on attention probabilities, as Hugging Face's attention_dropout
    bos_token_id: int | None = None  # carried to and from config.json; the forward pass does not use them
    eos_token_id: int | list | None = None

    def __post_init__(self):
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise UserError(f"LLaMAConfig: n_embd {self.n_embd} is not divisible by n_head {self.n_head}; "
                                 f"set head_dim explicitly")
            self.head_dim = self.n_embd // self.n_head
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_head % self.n_kv_head:
            raise UserError(f"LLaMAConfig: n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        if self.head_dim % 2:
            raise UserError(f"LLaMAConfig: head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind != "llama3":
                raise UserError(f"rope scaling type {kind!r} is not supported: only Llama 3.1's 'llama3' (or none). "
                                 f"Its positions would be encoded wrongly, so we refuse rather than load it.")
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
            if missing:
                raise UserError(f"rope_scaling of type 'llama3' lacks {missing}")
            self.rope_scaling = {"rope_type": "llama3", **{k: self.rope_scaling[k] for k in LLAMA3_ROPE_KEYS}}


# ---- RoPE --------------------------------------------------------------------------------------------------------
def rope_frequencies(config, device=None):
    """inv_freq (D/2,): the angle per position of each channel pair, theta^(-2i/D) for i = 0 .. D/2-1, float32.

    Recomputed on every forward (D/2 numbers): cheaper than the bookkeeping of a buffer, and a buffer would be
    rounded by model.to(bfloat16), which at position 10k turns into angles that are off by whole radians.
    """
    D = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    if config.rope_scaling is not None:
        inv_freq = llama3_scaled_frequencies(inv_freq, **{k: config.rope_scaling[k] for k in LLAMA3_ROPE_KEYS})
    return inv_freq


def llama3_scaled_frequencies(inv_freq, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings):
    """Llama 3.1's context extension: slow the low-frequency channels down by `factor`, keep the fast ones.

    A channel whose wavelength (2 pi / inv_freq) is short compared with the pretraining context L encodes local
    order, which a longer context does not change: kept (wavelength < L / high_freq_factor). A channel whose
    wavelength exceeds L / low_freq_factor never completed a turn in pretraining: dividing its frequency by
    `factor` maps the longer context onto angles it has seen. In between, blend linearly in L / wavelength.
    """
    wavelength = 2 * math.pi / inv_freq  # (D/2,)
    smooth = (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smooth = smooth.clamp(0.0, 1.0)  # 0: fully slowed down, 1: unchanged
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def rope_cos_sin(inv_freq, positions):
    """cos, sin (..., T, D) for absolute positions (..., T). Channel i and channel i + D/2 form a pair (Hugging Face's
    "rotate half" layout; Meta's original code paired adjacent channels, and HF permuted q/k weights to match)."""
    angles = positions.float()[..., None] * inv_freq  # (..., T, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, D)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+D/2}) of x (B, H, T, D) by its angle: (a, b) -> (a cos - b sin, b cos + a sin)."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (B, H, T, D): (a, b) -> (-b, a)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


# ---- the blocks --------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()  # the mean of squares overflows/underflows easily in half precision
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (B, T, C)
        return self.weight * normed.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        H, H_kv, D, C = config.n_head, config.n_kv_head, config.head_dim, config.n_embd
        self.q_proj = nn.Linear(C, H * D, bias=config.attention_bias)
        self.k_proj = nn.Linear(C, H_kv * D, bias=config.attention_bias)
        self.v_proj = nn.Linear(C, H_kv * D, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * D, C, bias=config.attention_bias)
        self.o_proj.residual_init = True
        self.n_head, self.n_kv_head, self.head_dim = H, H_kv, D
        self.dropout, self.layer_idx = config.dropout, layer_idx

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        B, T, _ = x.size()
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))  # one call: a LoRA can share work (modules.py)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # the cache stores k already rotated
        # causal softmax(q k^T / sqrt(D)) v; each K/V head is shared by H // H_kv query heads
        y = cached_attention(q, k, v, kv_cache, self.layer_idx, self.dropout if self.training else 0.0,
                             attn_mask)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, Fi = config.n_embd, config.intermediate_size
        self.gate_proj = nn.Linear(C, Fi, bias=config.mlp_bias)
        self.up_proj = nn.Linear(C, Fi, bias=config.mlp_bias)
        self.down_proj = nn.Linear(Fi, C, bias=config.mlp_bias)
        self.down_proj.residual_init = True

    def forward(self, x):
        # the gate decides, per hidden unit, how much of up(x) passes: (B, T, F) * (B, T, F) -> down to (B, T, C)
        # (B, T, F) each, on their own: grouped through project() as q/k/v are, they measured no faster (the 8x
        # wider base GEMMs hide what one GEMM for two thin ones saves; bench/README.md, shared_input)
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, kv_cache=None, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, attn_mask)  # pre-norm residual, as GPT-2
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class LLaMA(CausalLM):
    model_type, config_class = "llama", LLaMAConfig

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.n_embd),  # no position embedding: RoPE
            layers=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            norm=RMSNorm(config.n_embd, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self._tie_weights()
        # GPT-2's init (model/gpt.py): N(0, 0.02), residual projections scaled down; RMSNorm starts at ones
        self.apply(lambda module: init_weights(module, config.n_layer))

    def _tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one tensor, two uses

    @staticmethod
    def scratch_config(s):
        """LLaMAConfig from train.py's settings, for init_from='scratch' (n_kv_head 0: n_head; intermediate_size 0:
        8/3 n_embd rounded up to a multiple of 256, as Llama 2)."""
        return LLaMAConfig(vocab_size=s["vocab_size"], n_embd=s["n_embd"], n_layer=s["n_layer"], n_head=s["n_head"],
                           n_kv_head=s["n_kv_head"] or s["n_head"], max_seq_len=s["block_size"],
                           rope_theta=s["rope_theta"], dropout=s["dropout"],
                           intermediate_size=s["intermediate_size"] or 256 * math.ceil(8 * s["n_embd"] / 3 / 256))

    @property
    def max_seq_len(self):
        return self.config.max_seq_len - self.num_virtual_tokens

    def forward(self, idx, targets=None, kv_cache=None, position_ids=None, inputs_embeds=None, logits_to_keep=0):
        """idx (B, T) token ids, or inputs_embeds (B, T, C) in their place (prompt tuning's virtual tokens).
        position_ids (B, T): several examples packed in a row, each restarting at 0 and attending only to itself
        (see packed_causal_mask); None: one sequence a row, positions 0..T-1 after the cached ones, or, when the
        cache's rows are left-padded (batch_generate), each row's own (KVCache.positions, padded_mask).
        logits_to_keep n > 0: logits of the last n positions only (decoding needs the last one's)."""
        if inputs_embeds is None:
            if hasattr(self, "prompt_encoder"):  # prompt/prefix tuning (prompts/): n learned positions come first
                kv_cache = self.prompt_encoder.prefill(self, idx.size(0), kv_cache)
            inputs_embeds = self.model.embed_tokens(idx)  # (B, T, C)
        B, T, _ = inputs_embeds.size()
        start = kv_cache.pos if kv_cache is not None else 0  # decoding: the new tokens sit after the cached ones
        if start + T > self.config.max_seq_len:
            raise UserError(f"sequence of {start + T} tokens > max_seq_len {self.config.max_seq_len}")
        device = inputs_embeds.device
        positions = torch.arange(start, start + T, device=device)  # (T,)
        mask = None
        if position_ids is not None:
            if kv_cache is not None:
                raise UserError("position_ids (packed examples) are for training; decoding with a KV cache is causal")
            positions, mask = position_ids[:, None], packed_causal_mask(position_ids)  # (B, 1, T), (B, 1, T, T)
        elif kv_cache is not None and kv_cache.key_mask is not None:  # left-padded rows: each its own positions
            positions = kv_cache.positions[:, None, start:start + T]  # (B, 1, T)
            mask = padded_mask(kv_cache, T)  # (B, 1, T, S)
        # (T, D) each, or (B, 1, T, D) for packed or padded rows (broadcast over heads); shared by all layers
        cos, sin = rope_cos_sin(rope_frequencies(self.config, device), positions)
        x = inputs_embeds
        for layer in self.model.layers:
            x = self.run_block(layer, x, cos, sin, kv_cache, mask)
        return self.head_and_loss(self.model.norm(x), targets, logits_to_keep)  # training: (None, loss)

    def make_kv_cache(self, batch_size, max_len, pad=None):
        """An empty KVCache for max_len tokens a row; pad (B,): left padding per row (KVCache says how it is used)."""
        c, p, n = self.config, self.lm_head.weight, self.num_virtual_tokens
        # prompt/prefix tuning's n positions sit in the cache too, before a row's padding
        return KVCache(c.n_layer, batch_size, c.n_kv_head, max_len + n, c.head_dim, p.device, p.dtype, pad, n)

    # ---- Hugging Face checkpoints ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, **overrides):
        """Load a Hugging Face LLaMA folder (single or sharded safetensors, or pytorch_model.bin).

        Weights are converted to `dtype`, float32 by default whatever the checkpoint stores: float32 is what
        training and CPU want. Pass dtype=torch.bfloat16 to keep a bf16 checkpoint's size on a GPU.
        `overrides` may set dropout (the checkpoint's architecture itself cannot change).
        """
        model_dir = resolve_model_dir(name_or_path)
        return cls.from_hf_state_dict(load_hf_config(model_dir), load_hf_state_dict(model_dir), model_dir, dtype,
                                      **overrides)

    @classmethod
    def from_hf_state_dict(cls, hf_config, sd_hf, source, dtype=None, **overrides):
        """The model a Hugging Face config.json dict and state dict describe (from a folder, or a GGUF file
        converted by formats/gguf.py); `source` names where they came from, for error messages."""
        unknown = set(overrides) - {"dropout"}
        if unknown:
            raise UserError(f"from_pretrained: only dropout can be overridden, got {sorted(unknown)}")
        try:
            config = LLaMAConfig(**{**config_from_hf(hf_config), **overrides})
        except ValueError as e:
            raise UserError(f"{source}: {e}") from e
        # build on the meta device: no memory and no random init, since every tensor comes from the checkpoint
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype or torch.float32).to_empty(device="cpu")
        model._tie_weights()  # to_empty made lm_head and embed_tokens two separate tensors again
        sd_hf = dict(t for t in (tensor_from_hf(k, v, config) for k, v in sd_hf.items()) if t)
        sd = model.state_dict()
        ours = [k for k in sd if not (config.tie_word_embeddings and k == "lm_head.weight")]
        check_keys(f"LLaMA.from_pretrained({source})", ours, sd_hf)
        with torch.no_grad():
            for k in ours:
                if sd_hf[k].shape != sd[k].shape:
                    raise UserError(f"{source}: tensor {k} has shape {tuple(sd_hf[k].shape)}, "
                                     f"the config implies {tuple(sd[k].shape)}")
                sd[k].copy_(sd_hf[k])  # also converts the dtype
        return model

    def hf_config(self):
        c = self.config
        return {"model_type": self.model_type, "architectures": ["LlamaForCausalLM"], "vocab_size": c.vocab_size,
                "hidden_size": c.n_embd, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.n_layer,
                "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
                "hidden_act": "silu", "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.rms_norm_eps,
                # the layout transformers 4.x writes; 5.x reads it too (and writes rope_parameters instead)
                "rope_theta": c.rope_theta, "rope_scaling": c.rope_scaling, "attention_bias": c.attention_bias,
                "mlp_bias": c.mlp_bias, "attention_dropout": c.dropout, "tie_word_embeddings": c.tie_word_embeddings,
                "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "initializer_range": 0.02,
                "torch_dtype": str(self.lm_head.weight.dtype).removeprefix("torch.")}

    def save_pretrained(self, model_dir):
        """Write a Hugging Face LLaMA folder (config.json + model.safetensors) that transformers loads."""
        tied = self.config.tie_word_embeddings
        sd = {k: v for k, v in self.architecture_state_dict().items() if not (tied and k == "lm_head.weight")}
        save_hf_folder(model_dir, self.hf_config(), sd)


def config_from_hf(hf):
    """LLaMAConfig keyword arguments from a Hugging Face config.json dict (transformers 4.x or 5.x layout)."""
    if hf.get("model_type") != LLaMA.model_type:
        raise UserError(f"config.json has model_type={hf.get('model_type')!r}, not {LLaMA.model_type!r}; "
                         f"model.load_pretrained picks the class by model_type")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act={hf['hidden_act']!r} is not supported (LLaMA's SwiGLU uses silu)")
    # transformers 4.x: top-level rope_theta + rope_scaling {"rope_type" or "type": ...};
    # transformers 5.x: rope_parameters {"rope_theta": ..., "rope_type": ..., scaling keys}
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"partial_rotary_factor={rope['partial_rotary_factor']} is not supported (RoPE on all of D)")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    return dict(vocab_size=hf["vocab_size"], n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], head_dim=hf.get("head_dim"),
                rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6), max_seq_len=hf.get("max_position_embeddings", 2048),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
                dropout=hf.get("attention_dropout", 0.0), bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"))


def tensor_from_hf(name, tensor, config):
    """(our name, tensor) for a Hugging Face LLaMA tensor (the same names), or None for one we do not keep: RoPE's
    inv_freq, which older transformers stored and we compute (rope_frequencies), and a tied lm_head.weight, which
    some checkpoints store next to the embedding it shares."""
    if name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight"):
        return None
    return name, tensor
