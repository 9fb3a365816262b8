"""GPT-2, written out by hand (after nanoGPT / build-nanogpt).

Module names match Hugging Face's GPT2LMHeadModel one to one (transformer.h.0.attn.c_attn, ...), so a
Hugging Face checkpoint loads as a plain state dict and a LoRA adapter's keys name the same modules.
One difference: Hugging Face stores GPT-2's projections as `Conv1D` with weight (in, out); ours are
`nn.Linear` with weight (out, in), so loading and saving transposes those four matrices.

Shapes: B batch, T sequence length, C = n_embd channels, H = n_head heads, D = C // H head size.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import KVCache, cached_attention, packed_causal_mask, padded_mask
from .hf import check_keys, load_hf_config, load_hf_state_dict, resolve_model_dir, save_hf_folder
from .lm import CausalLM
from tools.errors import UserError


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64: faster matmuls
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2
    layer_norm_eps: float = 1e-5


def init_weights(module, n_layer):
    """GPT-2's init, for model.apply(): N(0, 0.02) for Linears and Embeddings, zero biases, and residual
    projections (marked `residual_init`) scaled by 1/sqrt(2 * n_layer): each block adds two residual
    branches, and this keeps the residual stream's variance from growing with depth."""
    if isinstance(module, nn.Linear):
        std = 0.02 * ((2 * n_layer) ** -0.5 if getattr(module, "residual_init", False) else 1.0)
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one GEMM
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_init = True  # GPT-2 scales the init of residual projections (see init_weights)
        self.n_head, self.dropout, self.layer_idx = config.n_head, config.dropout, layer_idx
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None, attn_mask=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        # flash attention when the backend has it; softmax(q k^T / sqrt(D)) v with a causal mask
        y = cached_attention(q, k, v, kv_cache, self.layer_idx, self.dropout if self.training else 0.0, attn_mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_init = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 used the tanh approximation of GELU; we keep it so checkpoints reproduce exactly
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, attn_mask=None):
        x = x + self.attn(self.ln_1(x), kv_cache, attn_mask)  # pre-norm residual: the stream x is never normalised
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(CausalLM):
    model_type, config_class = "gpt2", GPTConfig
    CONV1D_NAMES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # learned position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # weight tying: the output projection is the token embedding (saves 38M params at 124M scale)
        self.lm_head.weight = self.transformer.wte.weight
        self.apply(lambda module: init_weights(module, config.n_layer))

    @staticmethod
    def scratch_config(s):
        """GPTConfig from train.py's settings, for init_from='scratch'."""
        return GPTConfig(block_size=s["block_size"], vocab_size=s["vocab_size"], n_layer=s["n_layer"],
                         n_head=s["n_head"], n_embd=s["n_embd"], dropout=s["dropout"], bias=s["bias"])

    @property
    def max_seq_len(self):
        return self.config.block_size - self.num_virtual_tokens

    def forward(self, idx, targets=None, kv_cache=None, position_ids=None, inputs_embeds=None, logits_to_keep=0):
        """idx (B, T) token ids, or inputs_embeds (B, T, C) in their place (prompt tuning's virtual tokens).
        position_ids (B, T): several examples packed in a row, each restarting at 0 and attending only to itself
        (see packed_causal_mask); None: one sequence a row, positions 0..T-1 after the cached ones, or, when the
        cache's rows are left-padded (batch_generate), each row's own (KVCache.positions, padded_mask).
        logits_to_keep n > 0: logits of the last n positions only (decoding needs the last one's)."""
        if inputs_embeds is None:
            if hasattr(self, "prompt_encoder"):  # prompt/prefix tuning (prompts/): n learned positions come first
                kv_cache = self.prompt_encoder.prefill(self, idx.size(0), kv_cache)
            inputs_embeds = self.transformer.wte(idx)  # (B, T, C)
        B, T, _ = inputs_embeds.size()
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise UserError(f"sequence of {start + T} tokens > block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=inputs_embeds.device)  # (T,)
        mask = None
        if position_ids is not None:
            if kv_cache is not None:
                raise UserError("position_ids (packed examples) are for training; decoding with a KV cache is causal")
            pos, mask = position_ids, packed_causal_mask(position_ids)  # (B, T), (B, 1, T, T)
        elif kv_cache is not None and kv_cache.key_mask is not None:  # left-padded rows: each its own positions
            pos, mask = kv_cache.positions[:, start:start + T], padded_mask(kv_cache, T)  # (B, T), (B, 1, T, S)
        x = self.transformer.drop(inputs_embeds + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = self.run_block(block, x, kv_cache, mask)
        return self.head_and_loss(self.transformer.ln_f(x), targets, logits_to_keep)  # training: (None, loss)

    def make_kv_cache(self, batch_size, max_len, pad=None):
        """An empty KVCache for max_len tokens a row; pad (B,): left padding per row (KVCache says how it is used)."""
        c, p, n = self.config, self.lm_head.weight, self.num_virtual_tokens
        # prompt/prefix tuning's n positions sit in the cache too, before a row's padding
        return KVCache(c.n_layer, batch_size, c.n_head, max_len + n, c.n_embd // c.n_head, p.device, p.dtype, pad, n)

    # ---- Hugging Face checkpoints ------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path, dtype=None, **overrides):
        """Load a Hugging Face GPT-2 folder (or a hub name found in the local cache).

        `overrides` may set dropout (the checkpoint's architecture itself cannot change).
        """
        model_dir = resolve_model_dir(name_or_path)
        unknown = set(overrides) - {"dropout"}
        if unknown:
            raise UserError(f"from_pretrained: only dropout can be overridden, got {sorted(unknown)}")
        try:
            config = GPTConfig(**config_from_hf(load_hf_config(model_dir)), **overrides)
        except ValueError as e:
            raise UserError(f"{model_dir}: {e}") from None
        model = cls(config)
        sd_hf = dict(t for t in (tensor_from_hf(k, v) for k, v in load_hf_state_dict(model_dir).items()) if t)
        ours = [k for k in model.state_dict() if k != "lm_head.weight"]
        check_keys(f"GPT.from_pretrained({name_or_path})", ours, sd_hf)
        with torch.no_grad():
            sd = model.state_dict()
            for k in ours:
                if sd_hf[k].shape != sd[k].shape:
                    raise UserError(f"{model_dir}: tensor {k} has shape {tuple(sd_hf[k].shape)}, "
                                     f"config.json implies {tuple(sd[k].shape)}")
                sd[k].copy_(sd_hf[k])
        if dtype is not None:
            model.to(dtype)
        return model

    def hf_config(self):
        c = self.config
        return {"model_type": self.model_type, "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
                "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
                "n_head": c.n_head, "layer_norm_epsilon": c.layer_norm_eps, "activation_function": "gelu_new",
                "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
                "initializer_range": 0.02, "tie_word_embeddings": True, "bos_token_id": 50256,
                "eos_token_id": 50256, "torch_dtype": str(self.lm_head.weight.dtype).removeprefix("torch.")}

    def save_pretrained(self, model_dir):
        """Write a Hugging Face GPT-2 folder (config.json + model.safetensors) that transformers loads."""
        if not self.config.bias:
            raise UserError("save_pretrained: Hugging Face GPT-2 has biases; a bias=False model has no HF format")
        sd = {}
        for k, v in self.architecture_state_dict().items():
            if k == "lm_head.weight":  # tied to wte
                continue
            sd[k] = v.t() if k.endswith(self.CONV1D_NAMES) else v  # Linear (out, in) -> Conv1D (in, out)
        save_hf_folder(model_dir, self.hf_config(), sd)

# ---- Hugging Face GPT-2 checkpoints, one config and one tensor at a time ----------------------------------------
def config_from_hf(hf):
    """GPTConfig keyword arguments from a Hugging Face GPT-2 config.json dict; refuses what our GPT lacks."""
    if hf.get("model_type") != GPT.model_type:
        raise UserError(f"config.json has model_type={hf.get('model_type')!r}, not {GPT.model_type!r}; "
                         f"model.load_pretrained picks the class by model_type")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"activation_function={hf['activation_function']!r} is not supported "
                         f"(our GPT uses GPT-2's tanh GELU)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(flag):
            raise UserError(f"config.json sets {flag}=true, which our GPT does not implement")
    return dict(block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), vocab_size=hf["vocab_size"],
                n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True,
                layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))


def tensor_from_hf(name, tensor, config=None):
    """(our name, tensor) for a Hugging Face GPT-2 tensor, or None for one we do not keep: the attention mask
    buffers, and lm_head.weight (tied to wte: one tensor). GPT2Model checkpoints (like the original "gpt2") have
    no "transformer." prefix; Conv1D weights (in, out) become Linear weights (out, in)."""
    if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
        return None
    name = name if name.startswith("transformer.") else "transformer." + name
    return name, tensor.t() if name.endswith(GPT.CONV1D_NAMES) else tensor
