"""Putting LoRA into a model: choose layers by name, swap them for LoRALinear, freeze the rest.

    config = LoRAConfig(r=8, alpha=16, targets=("c_attn",))
    apply_lora(model, config)            # in place; returns model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

Matching `targets` against qualified module names (the names of model.named_modules()), as PEFT does:
  - a list/tuple of names: a module matches if its name equals one of them or ends with "." + it, so "c_attn"
    matches "transformer.h.3.attn.c_attn" and "ff.1" matches "layers.0.ff.1" (but "c_proj" also matches both the
    attention's and the MLP's c_proj: say "attn.c_proj" for one of them);
  - a single string: a regular expression that must match the whole name (re.fullmatch), e.g.
    r"transformer\\.h\\.(10|11)\\.attn\\.c_attn" for the last two layers only. A string with a comma (names
    written as one string, "q_proj,v_proj") is refused: give names as a list.
Only nn.Linear modules (and QuantLinear, a quantized base: quant/quantize.py) are adapted. A matched leaf that is
neither (an Embedding, a LayerNorm) is an error; matched containers (e.g. ".*attn.*" also matching the attention
block) are skipped.

Decisions worth knowing:
  - apply_lora on a model that already has LoRA layers is an error (no silent stacking of adapters).
  - modules_to_save are trained in place (full fine-tuning of, say, ln_f) and saved in the adapter. Unlike PEFT,
    no frozen copy is kept, so lora_disabled() does not revert them, and parameter counts do not double them.
  - A target whose weight is tied to another module (GPT-2's lm_head shares wte's weight) is allowed with a
    warning: LoRA then adapts the output projection only (wte is unchanged, as in PEFT). merge_lora refuses such
    a layer; merge_and_unload gives it its own merged weight, which unties it.
  - Three ways out: merge_lora / unmerge_lora fold s*B@A into the weights and back (reversible; layers stay
    LoRALinear, running a plain F.linear while merged); merge_and_unload replaces them by plain nn.Linear layers
    holding the merged weights (export: the state dict is the base model's again); remove_lora drops the adapters.
  - The config is kept (a copy) as `model.lora_config` for save_adapter and lora_state_dict.
  - On a quantized base (QLoRA) LoRA, rsLoRA, LoRA+, both modes, dropout and DoRA all work (DoRA's magnitude is the
    norm of the dequantized W + s B A). Refused before the model is touched: modules_to_save holding a quantized
    layer (a packed weight cannot train), and init='pissa': PiSSA needs the full-precision W for its SVD and
    residual. PEFT refuses it on a quantized weight too, asking for PiSSA in full precision and the residual
    quantized afterwards; here the base is quantized while loading, before apply_lora, so no full-precision W is
    left, and an SVD of the dequantized W, its residual quantized again, would round the base twice and no longer
    start at the base model.
"""
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from lora.dora import add_magnitude
from model.modules import collapse_names, name_matches, tied_owners
from lora.layer import MODES, LoRALinear
from lora.pissa import check_init, is_pissa, pissa_init_
from quant import QuantLinear
from tools.errors import UserError


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple | list | str = ("c_attn",)  # GPT-2's fused q,k,v projection: PEFT's default for gpt2
    mode: str = "split"  # "split" | "fused", see lora/layer.py
    rslora: bool = False  # scaling alpha/sqrt(r) instead of alpha/r
    modules_to_save: tuple | list = ()  # modules trained fully and saved with the adapter, e.g. ("ln_f",)
    init: str = "kaiming"  # "kaiming" | "gaussian" | "pissa" | "pissa_niter_K" (lora/pissa.py)
    use_dora: bool = False  # DoRA: a trainable magnitude per output row (lora/dora.py)
    loraplus_lr_ratio: float = 1.0  # LoRA+: lora_B learns this many times faster than lora_A (lora/loraplus.py)

    def __post_init__(self):
        if not (isinstance(self.r, int) and self.r > 0):
            raise UserError(f"LoRAConfig.r must be a positive int, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.mode not in MODES:
            raise UserError(f"LoRAConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "fused" and self.dropout > 0:
            raise UserError("LoRAConfig: mode='fused' needs dropout=0 (see lora/layer.py); use mode='split'")
        if isinstance(self.targets, str):
            if self.targets == ALL_LINEAR:
                pass
            elif "," in self.targets and "{" not in self.targets:
                names = tuple(t.strip() for t in self.targets.split(",") if t.strip())
                raise UserError(f"LoRA targets {self.targets!r} is a str, which is a regex over whole module names; "
                                 f"for names give a list: {names!r} (train.py: --lora_targets='{names!r}'), "
                                 f"or a regex such as '.*\\.({'|'.join(names)})'")
            try:
                re.compile(self.targets)  # fail now on a bad regex
            except re.error as e:
                raise UserError(f"LoRA targets {self.targets!r} is not a valid regular expression ({e}); give "
                                 f"module names, e.g. ('c_attn',), or fix the regex") from None
        elif not self.targets:
            raise UserError("LoRAConfig.targets is empty: name at least one nn.Linear, e.g. ('c_attn',)")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = (self.modules_to_save,)
        check_init(self.init)
        if not isinstance(self.use_dora, bool):
            raise UserError(f"LoRAConfig.use_dora must be True or False, got {self.use_dora!r}")
        if not (isinstance(self.loraplus_lr_ratio, (int, float)) and self.loraplus_lr_ratio > 0):
            raise UserError(f"LoRAConfig.loraplus_lr_ratio must be a positive number (1 = plain LoRA), "
                             f"got {self.loraplus_lr_ratio!r}")


LORA_KEYS = (".lora_A", ".lora_B", ".lora_magnitude_vector", ".lora_A_init", ".lora_B_init")  # a layer's own tensors


def lora_layers(model):
    """(name, LoRALinear) for every adapted layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


ALL_LINEAR = "all-linear"  # PEFT's name for every Linear but the output layer (lm_head)


def _find_targets(model, targets):
    if targets == ALL_LINEAR:
        return [n for n, m in model.named_modules() if type(m) in (nn.Linear, QuantLinear) and n != "lm_head"
                and not n.endswith(".lm_head")]
    linears, wrong_type = [], []
    for name, module in model.named_modules():
        if not name or not name_matches(name, targets):
            continue
        if type(module) in (nn.Linear, QuantLinear):  # exact type: subclasses may have their own forward
            linears.append(name)
        elif not list(module.children()):
            wrong_type.append(f"{name} ({type(module).__name__})")
    if wrong_type:
        raise UserError(f"LoRA targets {targets!r} match modules that are not nn.Linear: {', '.join(wrong_type)}. "
                         f"Only nn.Linear layers can be adapted; train others fully with modules_to_save.")
    if not linears:
        existing = collapse_names(n for n, m in model.named_modules() if type(m) is nn.Linear)
        regex = " (a str is a regex over whole names; names go in a tuple)" if isinstance(targets, str) else ""
        raise UserError(f"LoRA targets {targets!r} match no nn.Linear in {type(model).__name__}{regex}. "
                         f"Its nn.Linear layers are: {', '.join(existing) or '(none)'}")
    return linears


def _modules_to_save(model, patterns):
    names = [n for n, _ in model.named_modules() if n and name_matches(n, tuple(patterns))]
    missing = [p for p in patterns if not any(name_matches(n, (p,)) for n in names)]
    if missing:
        raise UserError(f"modules_to_save {missing} match no module in {type(model).__name__}")
    return names


def _refuse_on_quantized_base(model, config, targets, saved):
    """A ValueError naming the option, for the LoRAConfig options that cannot work on a quantized base (QLoRA)."""
    quantized = [n for n in targets if isinstance(model.get_submodule(n), QuantLinear)]
    if quantized and is_pissa(config.init):
        method = model.get_submodule(quantized[0]).weight.method
        raise UserError(f"init={config.init!r} cannot start from a quantized base ({method}: "
                         f"{', '.join(collapse_names(quantized))}): PiSSA's SVD and residual need the full-precision "
                         f"weight; use init='kaiming' or 'gaussian', or a full-precision base")
    packed = [n for n in saved if any(isinstance(m, QuantLinear) for m in model.get_submodule(n).modules())]
    if packed:
        raise UserError(f"modules_to_save {', '.join(collapse_names(packed))} hold quantized layers, whose packed "
                         f"weights cannot train; leave them out, or target their Linear layers with LoRA")


def apply_lora(model: nn.Module, config: LoRAConfig, pissa_factors: dict | None = None) -> nn.Module:
    """Replace each targeted nn.Linear by a LoRALinear (in place), freeze everything else, return the model.

    config.init picks how A and B start (PiSSA also replaces the base weights, lora/pissa.py); pissa_factors
    {layer name: (A0, B0)} restores a saved PiSSA start instead of computing the SVD (resuming a run). A config
    that cannot work (a typo in modules_to_save, a module both target and saved, an option a quantized base does
    not allow) is refused before any layer is replaced."""
    if lora_layers(model):
        raise UserError(f"{type(model).__name__} already has {len(lora_layers(model))} LoRA layers; apply_lora "
                         f"once (or merge_and_unload(model) first to stack a new adapter on merged weights)")
    targets = _find_targets(model, config.targets)
    saved = _modules_to_save(model, config.modules_to_save)  # fails early on a typo, too
    clash = [n for n in saved if n in targets]
    if clash:
        raise UserError(f"modules {', '.join(collapse_names(clash))} are both LoRA targets and modules_to_save; "
                         f"choose one (LoRA trains a low-rank update, modules_to_save the whole module)")
    _refuse_on_quantized_base(model, config, targets, saved)
    owners = tied_owners(model)
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        linear = model.get_submodule(name)
        layer = LoRALinear(linear, r=config.r, alpha=config.alpha, dropout=config.dropout, rslora=config.rslora,
                           mode=config.mode)
        shared = [o for o in owners.get(id(linear.weight), []) if o != f"{name}.weight"]  # none if quantized
        if shared:
            layer.weight_is_tied = True
            warnings.warn(f"LoRA target {name}.weight is tied to {', '.join(shared)}: LoRA adapts {name}'s output "
                          f"only; merge_lora refuses this layer and merge_and_unload unties it.")
        if is_pissa(config.init):
            pissa_init_(layer, config.init, (pissa_factors or {}).get(name))
        elif config.init != "kaiming":
            layer.reset_lora_parameters(config.init)
        if config.use_dora:  # after the init, as PEFT: m = ||W + s B A||
            add_magnitude(layer)
        setattr(model.get_submodule(parent_name), child_name, layer)
    model.lora_config = replace(config)  # a copy: set_lora_mode updates it, the caller's stays as given
    mark_only_lora_trainable(model)
    return model


def mark_only_lora_trainable(model: nn.Module, modules_to_save=None) -> nn.Module:
    """requires_grad=True for lora_A, lora_B (DoRA: and lora_magnitude_vector) and modules_to_save (default:
    model.lora_config's); False elsewhere."""
    if modules_to_save is None:
        config = getattr(model, "lora_config", None)
        modules_to_save = config.modules_to_save if config is not None else ()
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)
        if layer.lora_magnitude_vector is not None:
            layer.lora_magnitude_vector.requires_grad_(True)
    for name in _modules_to_save(model, modules_to_save):
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module, state: dict | None = None) -> dict:
    """Only what the adapter adds: every lora_A / lora_B (DoRA's lora_magnitude_vector, PiSSA's lora_A_init /
    lora_B_init), plus the tensors of modules_to_save (our names).

    state: the state dict to filter (default model.state_dict()), e.g. an FSDP model's sharded one before
    gathering it."""
    config = getattr(model, "lora_config", None)
    saved = _modules_to_save(model, config.modules_to_save) if config is not None else []
    state = model.state_dict() if state is None else state
    return {k: v for k, v in state.items()
            if k.endswith(LORA_KEYS) or any(k.startswith(m + ".") for m in saved)}


def set_lora_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch every LoRA layer between 'split' and 'fused' (same function, different compute path)."""
    for _, layer in lora_layers(model):
        layer.set_mode(mode)
    if getattr(model, "lora_config", None) is not None:
        model.lora_config.mode = mode
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold s B A into every LoRA layer's weight, in place and reversibly (unmerge_lora undoes it).

    A merged layer runs a plain F.linear: inference at the base model's speed. The layers stay LoRALinear (their
    state dict still has lora_A/lora_B); to export plain nn.Linear layers use merge_and_unload.
    """
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora: weight -= s B A in every merged layer (original weight up to fp32 rounding)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding W + s B A (for export; not reversible).

    The result has the original architecture and state-dict keys, so it can be saved as an ordinary checkpoint.
    A tied target (lm_head sharing wte's weight) gets its own merged weight: the tie is broken, by necessity.
    """
    return _replace_lora_layers(model, merge=True)


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop the adapters: put back plain nn.Linear layers holding the very same (unmerged) weight tensors."""
    merged = [n for n, layer in lora_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"remove_lora: {', '.join(collapse_names(merged))} are merged; unmerge_lora(model) "
                           f"first, or use merge_and_unload to keep the merged weights")
    return _replace_lora_layers(model, merge=False)


def _replace_lora_layers(model, merge):
    for name, layer in lora_layers(model):
        weight = layer.weight  # the same Parameter: ties and optimizer references survive
        quantized = not isinstance(weight, torch.Tensor)  # a QuantLinear's packed weight (quant/quantize.py)
        if merge and (layer.weight_is_tied or quantized):  # a merged weight of its own, in full precision
            weight = nn.Parameter(layer.merged_weight().detach().to(layer.weight.dtype),
                                  requires_grad=False if quantized else layer.weight.requires_grad)
        elif merge:
            layer.merge()
        elif hasattr(layer, "lora_A_init"):  # PiSSA: put back W = W_res + s B0 A0 (up to rounding)
            with torch.no_grad():
                weight.copy_(weight.float() + layer.scaling * (layer.lora_B_init.float() @ layer.lora_A_init.float()))
        if quantized and not merge:
            plain = QuantLinear(weight, layer.bias)  # the quantized layer it wrapped
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            plain.weight = weight
            plain.bias = layer.bias
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, plain)
    for attr in ("lora_config", "lora_adapters", "active_adapter"):  # the named adapters (lora/named.py) go too
        if attr in model.__dict__:
            delattr(model, attr)
    return model


def disable_lora(model: nn.Module) -> nn.Module:
    """Make every LoRA layer compute the frozen base layer only (adapters kept; enable_lora turns them back on)."""
    merged = [n for n, layer in lora_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"cannot disable merged LoRA layers ({', '.join(collapse_names(merged))}): "
                           f"unmerge_lora(model) first")
    for _, layer in lora_layers(model):
        layer.enabled = False
    return model


def enable_lora(model: nn.Module) -> nn.Module:
    for _, layer in lora_layers(model):
        layer.enabled = True
    return model


@contextmanager
def lora_disabled(model: nn.Module):
    """with lora_disabled(model): logits = model(idx)  # the base model, e.g. for a reference/KL term."""
    was_enabled = {name: layer.enabled for name, layer in lora_layers(model)}
    disable_lora(model)
    try:
        yield model
    finally:
        for name, layer in lora_layers(model):
            layer.enabled = was_enabled.get(name, True)
