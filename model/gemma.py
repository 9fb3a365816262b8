"""Gemma 3 (the text model), written out by hand, with Hugging Face's module names (Gemma3ForCausalLM).

It is LLaMA (model/llama.py) with these changes, each small:
  - Embeddings scaled by sqrt(C) on the way in (in the weights' dtype: bf16 rounds sqrt(640) = 25.30 to 25.25),
    and lm_head tied to the embedding: one (V, C) matrix reads tokens in and scores them out.
  - RMSNorm multiplies by (1 + w), not w: the weights start at zero, the norm as the identity scale.
  - Four norms per block (the "sandwich"): each branch's input is normed (input_layernorm, pre_feedforward_
    layernorm), as in LLaMA, and so is its output (post_attention_layernorm, post_feedforward_layernorm).
  - Queries and keys RMS-normed per head (q_norm, k_norm, over D) before RoPE: bounded attention logits.
  - GeGLU instead of SwiGLU: down(gelu_tanh(gate(x)) * up(x)).
  - Attention scores scaled by query_pre_attn_scalar^-0.5 instead of D^-0.5 (equal for most sizes).
  - Local and global layers (`layer_types`): a local ("sliding_attention") layer sees only the last
    `sliding_window` positions (itself included), a global ("full_attention") one all of them; five local layers
    for each global one, so a long context's KV cache is mostly the global layers' (attention.py's SlidingKVCache).
    Each kind has its own RoPE base: 10k local, 1M global (optionally `rope_scaling` 'linear': positions divided by
    `factor`).
  - The logits optionally soft-capped: cap * tanh(logits / cap) (final_logit_softcapping; Gemma 3 sets none).

Shapes: B batch, T sequence length, C = n_embd, H = n_head, H_kv = n_kv_head, D = head_dim, F = intermediate_size,
V = vocab_size, S = positions attended over (cached + new), W = sliding_window.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import SlidingKVCache, attend, packed_causal_mask, padded_mask
from .gpt import init_weights
from .hf import check_keys, load_hf_config, load_hf_state_dict, resolve_model_dir, save_hf_folder
from .llama import apply_rope, rope_cos_sin
from .lm import CausalLM, next_token_loss
from .modules import project
from tools.errors import UserError

LOCAL, GLOBAL = "sliding_attention", "full_attention"


@dataclass
class GemmaConfig:  # the defaults are Gemma 3 270M's
    vocab_size: int = 262144
    n_embd: int = 640  # Hugging Face's hidden_size
    intermediate_size: int = 2048
    n_layer: int = 18
    n_head: int = 4
    n_kv_head: int = 1  # grouped-query attention: each K/V head serves n_head // n_kv_head query heads
    head_dim: int = 256  # not n_embd // n_head: Gemma sets it on its own (4 x 256 > 640)
    query_pre_attn_scalar: float = 256  # attention scores are q . k * query_pre_attn_scalar^-0.5
    sliding_window: int = 512  # a local layer's query sees its own and the W - 1 positions before it
    layer_types: list | None = None  # per layer LOCAL or GLOBAL; None: every sliding_window_pattern-th is GLOBAL
    sliding_window_pattern: int = 6
    rope_theta: float = 1_000_000.0  # the global layers' RoPE base
    rope_local_theta: float = 10_000.0  # the local layers' (Hugging Face's rope_local_base_freq)
    rope_scaling: dict | None = None  # the global layers' scaling: None or {"rope_type": "linear", "factor": f}
    rms_norm_eps: float = 1e-6
    max_seq_len: int = 32768  # Hugging Face's max_position_embeddings
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    final_logit_softcapping: float | None = None
    # carried to and from config.json only: transformers' Gemma 3 does not apply it (q_norm/k_norm replace it)
    attn_logit_softcapping: float | None = None
    dropout: float = 0.0  # on attention probabilities, as Hugging Face's attention_dropout
    bos_token_id: int | None = 2  # carried to and from config.json; the forward pass does not use them
    eos_token_id: int | list | None = 1
    pad_token_id: int | None = 0

    def __post_init__(self):
        if self.layer_types is None:
            self.layer_types = [GLOBAL if (i + 1) % self.sliding_window_pattern == 0 else LOCAL
                                for i in range(self.n_layer)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.n_layer or set(self.layer_types) - {LOCAL, GLOBAL}:
            raise UserError(f"GemmaConfig: layer_types must list {self.n_layer} of {LOCAL!r} / {GLOBAL!r}, "
                             f"got {self.layer_types}")
        if self.n_head % self.n_kv_head:
            raise UserError(f"GemmaConfig: n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        if self.head_dim % 2:
            raise UserError(f"GemmaConfig: head_dim {self.head_dim} must be even (RoPE rotates pairs)")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind != "linear" or "factor" not in self.rope_scaling:
                raise UserError(f"rope scaling {self.rope_scaling} is not supported: only 'linear' with a factor "
                                 f"(Gemma 3's), or none. Its positions would be encoded wrongly, so we refuse.")
            self.rope_scaling = {"rope_type": "linear", "factor": float(self.rope_scaling["factor"])}


def rope_frequencies(config, local, device=None):
    """inv_freq (D/2,) of a local or a global layer: theta^(-2i/D), float32. 'linear' scaling divides the global
    layers' frequencies by `factor`: position p turns as far as p / factor did in pretraining."""
    D = config.head_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    if not local and config.rope_scaling is not None:
        inv_freq = inv_freq / config.rope_scaling["factor"]
    return inv_freq


def attention_mask(T, past, window, packed, device):
    """Which of the S = past + T keys each of the T new queries sees: (T, S) bool, or (B, 1, T, T) for packed rows;
    None for plain causal attention over T positions (SDPA's is_causal, no mask to build).
    Query i sits at absolute position past + i and sees key j iff j <= past + i (causal) and, in a local layer,
    past + i - j < W (the window). Packed rows (packed_causal_mask) also keep each example to itself."""
    if window is None and packed is None and past == 0:
        return None
    q = torch.arange(past, past + T, device=device)[:, None]  # (T, 1) absolute positions of the queries
    k = torch.arange(past + T, device=device)[None]  # (1, S) of the keys
    seen = k <= q  # (T, S) causal
    if window is not None:
        seen = seen & (q - k < window)  # (T, S): the last W positions only
    return seen if packed is None else packed & seen  # (B, 1, T, T)


# ---- the blocks --------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * (1 + weight), in float32, cast back after the multiplication (Gemma's order)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))  # 1 + 0: the identity scale
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., dim)
        return (normed * (1.0 + self.weight.float())).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        H, H_kv, D, C = config.n_head, config.n_kv_head, config.head_dim, config.n_embd
        self.q_proj = nn.Linear(C, H * D, bias=config.attention_bias)
        self.k_proj = nn.Linear(C, H_kv * D, bias=config.attention_bias)
        self.v_proj = nn.Linear(C, H_kv * D, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * D, C, bias=config.attention_bias)
        self.o_proj.residual_init = True
        self.q_norm = RMSNorm(D, config.rms_norm_eps)  # over each head's D channels
        self.k_norm = RMSNorm(D, config.rms_norm_eps)
        self.n_head, self.n_kv_head, self.head_dim = H, H_kv, D
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.dropout, self.layer_idx = config.dropout, layer_idx

    def forward(self, x, cos, sin, kv_cache=None, mask=None):
        B, T, _ = x.size()
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))  # one call: a LoRA can share work (modules.py)
        q = self.q_norm(q.view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, H, T, D)
        k = self.k_norm(k.view(B, T, self.n_kv_head, self.head_dim)).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # the cache stores k normed and rotated
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, H_kv, S, D): the past and these T
        # softmax(q k^T * scale + mask) v, each K/V head shared by H // H_kv query heads; mask None: plain causal
        y = attend(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                   dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))  # (B, T, C)


class GeGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        C, Fi = config.n_embd, config.intermediate_size
        self.gate_proj = nn.Linear(C, Fi, bias=False)
        self.up_proj = nn.Linear(C, Fi, bias=False)
        self.down_proj = nn.Linear(Fi, C, bias=False)
        self.down_proj.residual_init = True

    def forward(self, x):
        # SwiGLU's gate with GELU (tanh approximation) in place of SiLU: (B, T, F) * (B, T, F) -> (B, T, C)
        # (B, T, F) each, on their own: grouped through project() as q/k/v are, they measured no faster (the 8x
        # wider base GEMMs hide what one GEMM for two thin ones saves; bench/README.md, shared_input)
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        C, eps = config.n_embd, config.rms_norm_eps
        self.is_local = config.layer_types[layer_idx] == LOCAL
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(C, eps), RMSNorm(C, eps)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = RMSNorm(C, eps), RMSNorm(C, eps)
        self.self_attn = Attention(config, layer_idx)
        self.mlp = GeGLU(config)

    def forward(self, x, cos, sin, kv_cache=None, mask=None):
        # pre-norm residual branches, as LLaMA's, each also normed on its way out
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, mask))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x


class Gemma(CausalLM):
    model_type, config_class = "gemma3_text", GemmaConfig

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
        # GPT-2's init (model/gpt.py) for Linears and the embedding; the norms start at zero (scale 1 + 0)
        self.apply(lambda module: init_weights(module, config.n_layer))

    def _tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one tensor, two uses

    @staticmethod
    def scratch_config(s):
        """GemmaConfig from train.py's settings, for init_from='scratch': head_dim n_embd // n_head (and the
        score scale its -0.5 power), a window of a quarter of block_size (at most 512), every 6th layer global
        (the last one, with fewer than 6), n_kv_head 0: n_head, intermediate_size 0: LLaMA's 8/3 n_embd."""
        return GemmaConfig(vocab_size=s["vocab_size"], n_embd=s["n_embd"], n_layer=s["n_layer"], n_head=s["n_head"],
                           n_kv_head=s["n_kv_head"] or s["n_head"], head_dim=s["n_embd"] // s["n_head"],
                           query_pre_attn_scalar=s["n_embd"] // s["n_head"], max_seq_len=s["block_size"],
                           sliding_window=max(1, min(512, s["block_size"] // 4)),
                           sliding_window_pattern=min(6, s["n_layer"]), rope_theta=s["rope_theta"],
                           dropout=s["dropout"], bos_token_id=None, eos_token_id=None, pad_token_id=None,
                           intermediate_size=s["intermediate_size"] or 256 * math.ceil(8 * s["n_embd"] / 3 / 256))

    @property
    def max_seq_len(self):
        return self.config.max_seq_len - self.num_virtual_tokens

    def embed(self, idx):
        """Token embeddings (B, T, C) times sqrt(C), the factor rounded to the weights' dtype as Hugging Face does."""
        x = self.model.embed_tokens(idx)
        return x * torch.tensor(self.config.n_embd ** 0.5, dtype=x.dtype)

    def forward(self, idx, targets=None, kv_cache=None, position_ids=None, inputs_embeds=None, logits_to_keep=0):
        """idx (B, T) token ids, or inputs_embeds (B, T, C) in their place (prompt tuning's virtual tokens; not
        scaled by sqrt(C), as Hugging Face's). position_ids (B, T): several examples packed in a row, each
        restarting at 0 and attending only to itself (packed_causal_mask), within the window in local layers;
        None: one sequence a row, positions 0..T-1 after the cached ones, or, when the cache's rows are left-padded
        (batch_generate), each row's own (KVCache.positions, padded_mask). logits_to_keep n > 0: logits of the
        last n positions only."""
        if inputs_embeds is None:
            if hasattr(self, "prompt_encoder"):  # prompt/prefix tuning (prompts/): n learned positions come first
                kv_cache = self.prompt_encoder.prefill(self, idx.size(0), kv_cache)
            inputs_embeds = self.embed(idx)  # (B, T, C)
        T = inputs_embeds.size(1)
        past = kv_cache.pos if kv_cache is not None else 0  # decoding: the new tokens sit after the cached ones
        if past + T > self.config.max_seq_len:
            raise UserError(f"sequence of {past + T} tokens > max_seq_len {self.config.max_seq_len}")
        device = inputs_embeds.device
        positions, packed = torch.arange(past, past + T, device=device), None  # (T,)
        if position_ids is not None:
            if kv_cache is not None:
                raise UserError("position_ids (packed examples) are for training; decoding with a KV cache is causal")
            positions, packed = position_ids[:, None], packed_causal_mask(position_ids)  # (B, 1, T), (B, 1, T, T)
        padded = kv_cache is not None and kv_cache.key_mask is not None  # left-padded rows (batch_generate)
        if padded:
            positions = kv_cache.positions[:, None, past:past + T]  # (B, 1, T): each row's own
        # per kind of layer (local True, global False), shared by its layers: cos, sin (T, D) or (B, 1, T, D),
        # and the mask (None: plain causal)
        rope = {local: rope_cos_sin(rope_frequencies(self.config, local, device), positions) for local in (True, False)}
        window = {True: self.config.sliding_window, False: None}
        masks = {local: padded_mask(kv_cache, T, window[local]) if padded  # (B, 1, T, S)
                 else attention_mask(T, past, window[local], packed, device) for local in (True, False)}
        if isinstance(kv_cache, SlidingKVCache):  # a local layer attends over the keys of local_slots(T), in ring order
            masks[True] = masks[True][..., kv_cache.local_slots(T)]  # (T, S') or (B, 1, T, S')
        x = inputs_embeds
        for layer in self.model.layers:
            x = self.run_block(layer, x, *rope[layer.is_local], kv_cache, masks[layer.is_local])
        x = self.model.norm(x)
        if targets is None and logits_to_keep > 0:
            x = x[:, -logits_to_keep:]  # (B, n, C)
        cap = self.config.final_logit_softcapping
        if cap is None:
            return self.head_and_loss(x, targets)  # training: (None, loss), the chunked loss
        logits = cap * torch.tanh(self.lm_head(x) / cap)  # (B, T, V): no single weight gives these, full logits
        return logits, next_token_loss(logits, targets)

    def make_kv_cache(self, batch_size, max_len, pad=None):
        """Global layers keep every position, local ones their last W in a ring (SlidingKVCache, model/attention.py);
        pad (B,): left padding per row (KVCache says how it is used)."""
        c, p, n = self.config, self.lm_head.weight, self.num_virtual_tokens
        # prompt/prefix tuning's n positions sit in the cache too, before a row's padding
        return SlidingKVCache([t == LOCAL for t in c.layer_types], c.sliding_window, batch_size, c.n_kv_head,
                              max_len + n, c.head_dim, p.device, p.dtype, pad, n)  # H_kv heads

    # ---- Hugging Face checkpoints ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, **overrides):
        """Load a Hugging Face Gemma3ForCausalLM folder; weights in `dtype`, float32 by default (model/llama.py's
        from_pretrained says why). `overrides` may set dropout."""
        model_dir = resolve_model_dir(name_or_path)
        return cls.from_hf_state_dict(load_hf_config(model_dir), load_hf_state_dict(model_dir), model_dir, dtype,
                                      **overrides)

    @classmethod
    def from_hf_state_dict(cls, hf_config, sd_hf, source, dtype=None, **overrides):
        """The model a config.json dict and state dict describe (a folder, or a GGUF file via formats/gguf.py)."""
        unknown = set(overrides) - {"dropout"}
        if unknown:
            raise UserError(f"from_pretrained: only dropout can be overridden, got {sorted(unknown)}")
        try:
            config = GemmaConfig(**{**config_from_hf(hf_config), **overrides})
        except ValueError as e:
            raise UserError(f"{source}: {e}") from e
        with torch.device("meta"):  # no memory, no random init: every tensor comes from the checkpoint
            model = cls(config)
        model = model.to(dtype or torch.float32).to_empty(device="cpu")
        model._tie_weights()  # to_empty made lm_head and embed_tokens two separate tensors again
        sd_hf = dict(t for t in (tensor_from_hf(k, v, config) for k, v in sd_hf.items()) if t)
        sd = model.state_dict()
        ours = [k for k in sd if not (config.tie_word_embeddings and k == "lm_head.weight")]
        check_keys(f"Gemma.from_pretrained({source})", ours, sd_hf)
        with torch.no_grad():
            for k in ours:
                if sd_hf[k].shape != sd[k].shape:
                    raise UserError(f"{source}: tensor {k} has shape {tuple(sd_hf[k].shape)}, "
                                     f"the config implies {tuple(sd[k].shape)}")
                sd[k].copy_(sd_hf[k])  # also converts the dtype
        return model

    def hf_config(self):
        c = self.config
        rope_global = {"rope_type": "default", "rope_theta": c.rope_theta, **(c.rope_scaling or {})}
        return {"model_type": self.model_type, "architectures": ["Gemma3ForCausalLM"], "vocab_size": c.vocab_size,
                "hidden_size": c.n_embd, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.n_layer,
                "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
                "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": c.max_seq_len,
                "rms_norm_eps": c.rms_norm_eps, "query_pre_attn_scalar": c.query_pre_attn_scalar,
                "sliding_window": c.sliding_window, "layer_types": c.layer_types,
                # transformers 5.x's layout: one RoPE per kind of layer
                "rope_parameters": {GLOBAL: rope_global,
                                    LOCAL: {"rope_type": "default", "rope_theta": c.rope_local_theta}},
                "attention_bias": c.attention_bias, "attention_dropout": c.dropout,
                "final_logit_softcapping": c.final_logit_softcapping,
                "attn_logit_softcapping": c.attn_logit_softcapping, "tie_word_embeddings": c.tie_word_embeddings,
                "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
                "initializer_range": 0.02, "torch_dtype": str(self.lm_head.weight.dtype).removeprefix("torch.")}

    def save_pretrained(self, model_dir):
        """Write a Hugging Face Gemma 3 folder (config.json + model.safetensors) that transformers loads."""
        tied = self.config.tie_word_embeddings
        sd = {k: v for k, v in self.architecture_state_dict().items() if not (tied and k == "lm_head.weight")}
        save_hf_folder(model_dir, self.hf_config(), sd)


def config_from_hf(hf):
    """GemmaConfig keyword arguments from a Gemma3TextConfig config.json dict (transformers 4.x or 5.x layout)."""
    if hf.get("model_type") != Gemma.model_type:
        hint = " (the multimodal Gemma 3: only its text model is supported)" if hf.get("model_type") == "gemma3" else ""
        raise UserError(f"config.json has model_type={hf.get('model_type')!r}, not {Gemma.model_type!r}{hint}; "
                         f"model.load_pretrained picks the class by model_type")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise UserError(f"hidden_activation={act!r} is not supported (Gemma 3's GeGLU uses gelu_pytorch_tanh)")
    if hf.get("use_bidirectional_attention"):
        raise UserError("use_bidirectional_attention=True (an encoder) is not supported: a causal LM only")
    # 5.x: rope_parameters {full_attention: {rope_theta, rope_type, factor}, sliding_attention: {...}};
    # 4.x: rope_theta, rope_local_base_freq, rope_scaling (the global layers')
    params = hf.get("rope_parameters") or {}
    glob = {**(hf.get("rope_scaling") or {}), **(params.get(GLOBAL) or {})}
    local = params.get(LOCAL) or {}
    if local.get("rope_type", "default") != "default":
        raise UserError(f"RoPE scaling of the local layers ({local}) is not supported")
    kind = glob.get("rope_type", glob.get("type", "default"))
    n_head = hf.get("num_attention_heads", 8)
    return dict(vocab_size=hf["vocab_size"], n_embd=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
                n_layer=hf["num_hidden_layers"], n_head=n_head, n_kv_head=hf.get("num_key_value_heads") or n_head,
                head_dim=hf.get("head_dim", 256), query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
                sliding_window=hf.get("sliding_window") or hf.get("max_position_embeddings", 131072),
                layer_types=hf.get("layer_types"),  # else from the pattern (transformers 5.x writes it with a _)
                sliding_window_pattern=hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)),
                rope_theta=glob.get("rope_theta", hf.get("rope_theta", 1_000_000.0)),
                rope_local_theta=local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)),
                rope_scaling=None if kind == "default" else {**glob, "rope_type": kind},
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6), max_seq_len=hf.get("max_position_embeddings", 131072),
                tie_word_embeddings=hf.get("tie_word_embeddings", True), attention_bias=hf.get("attention_bias", False),
                final_logit_softcapping=hf.get("final_logit_softcapping"),
                attn_logit_softcapping=hf.get("attn_logit_softcapping"), dropout=hf.get("attention_dropout") or 0.0,
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"))


def tensor_from_hf(name, tensor, config):
    """(our name, tensor) for a Hugging Face Gemma 3 tensor (the same names), or None for one we do not keep: a
    tied lm_head.weight stored next to the embedding it shares, and the RoPE/embed-scale buffers we compute."""
    if name.endswith(("inv_freq", "embed_scale")) or (config.tie_word_embeddings and name == "lm_head.weight"):
        return None
    return name, tensor
