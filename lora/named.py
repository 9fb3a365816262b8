"""Several named adapters on one model, as PEFT's adapter_name: keep many, run one, combine them.

    load_adapter(model, "out/french")                        # the first adapter is "default" (PEFT's name)
    load_adapter(model, "out/poetry", adapter_name="poetry")  # added beside it; "default" stays active
    set_adapter(model, "poetry")                             # now the model computes base + poetry
    with lora_disabled(model): ...                           # the base model alone
    add_weighted_adapter(model, ["default", "poetry"], [0.7, 0.3], "mix", combination_type="cat")

How. Each adapter is its own set of LoRALinear layers, all sharing the frozen base weight and bias tensors (the
same Parameter objects, no copies). Only the active adapter's layers sit in the model; the others wait in
model.lora_adapters = {name: {"config": LoRAConfig, "layers": {module name: LoRALinear}}}. set_adapter swaps
layers in and out of their parent modules (a layer the new adapter does not target becomes a plain nn.Linear).
So the model always holds exactly "base + one adapter": the forward of one adapter is the single-adapter code,
at its speed, and everything else (training, save_adapter, merging, summary) sees the active adapter only.
Parked layers are not moved by model.to(); set_adapter moves a layer to its base weight's device when it comes in.

Not supported: modules_to_save (trained in place, there is no per-adapter copy to switch to) and PiSSA (it rewrote
the shared base weights; save it, which converts it to plain LoRA, and load that instead).

Combining (PEFT's add_weighted_adapter), per layer, with weights w_i and scalings s_i:
    linear: A = sum_i sign(w_i) sqrt(|w_i s_i|) A_i,  B = sum_i sqrt(|w_i s_i|) B_i   (same r for all; B A then
            has cross terms B_i A_j: cheap, but only an approximation of sum_i w_i s_i B_i A_i)
    cat:    A = [w_1 s_1 A_1; w_2 s_2 A_2; ...],  B = [B_1 | B_2 | ...]   (rank sum_i r_i; B A = sum_i w_i s_i B_i A_i
            exactly)
The new adapter has r = alpha = its rank (scaling 1; with rsLoRA, as in PEFT, sqrt(r)), the other settings of the
first adapter, and the union of their targets. DoRA adapters cannot be combined (their magnitudes do not add).
To fold the result into the base: set_adapter(model, name); merge_and_unload(model).
"""
from dataclasses import replace

import torch
import torch.nn as nn

from lora.inject import apply_lora, lora_layers, mark_only_lora_trainable
from model.modules import collapse_names
from lora.pissa import is_pissa
from tools.errors import UserError

DEFAULT = "default"


def _registry(model, first_name=DEFAULT):
    """model.lora_adapters, created on first use with the model's current adapter under `first_name`."""
    if "lora_adapters" not in model.__dict__:
        if getattr(model, "lora_config", None) is None:
            raise UserError(f"{type(model).__name__} has no LoRA adapter; apply_lora or load_adapter first")
        model.lora_adapters = {first_name: {"config": model.lora_config, "layers": dict(lora_layers(model))}}
        model.active_adapter = first_name
    return model.lora_adapters


def adapter_names(model) -> list[str]:
    return list(_registry(model)) if getattr(model, "lora_config", None) is not None else []


def active_adapter(model) -> str | None:
    return model.active_adapter if adapter_names(model) else None


def name_adapter(model, name):
    """Give the model's only adapter the name `name` (what load_adapter(..., adapter_name=) does first)."""
    registry = _registry(model, name)
    if list(registry) != [name]:
        raise UserError(f"the model has adapters {list(registry)}; name_adapter names a model's only adapter")
    return model


def adapter_layers(model, name) -> dict:
    """{module name: LoRALinear} of adapter `name` (active or parked)."""
    registry = _registry(model)
    if name not in registry:
        raise UserError(f"no adapter named {name!r}; the model has {list(registry)}")
    return registry[name]["layers"]


def _plain(layer):
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight, linear.bias = layer.weight, layer.bias  # the same Parameters
    return linear


def _swap_in(model, layers_by_name):
    """Put the given layers into the model (and plain Linears back where the current adapter's layers were)."""
    for name, layer in lora_layers(model):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _plain(layer))
    for name, layer in layers_by_name.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to(layer.weight.device))


def _check_can_switch(model, what):
    merged = [n for n, layer in lora_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"{what}: {', '.join(collapse_names(merged))} are merged; unmerge_lora(model) first")


def set_adapter(model, name):
    """Make adapter `name` the one the model computes with (and trains: only its tensors require grad)."""
    layers = adapter_layers(model, name)
    if name == model.active_adapter:
        return model
    _check_can_switch(model, "set_adapter")
    _swap_in(model, layers)
    model.lora_config, model.active_adapter = model.lora_adapters[name]["config"], name
    mark_only_lora_trainable(model)
    return model


def _check_combinable(configs):
    for name, config in configs.items():
        if config.modules_to_save:
            raise UserError(f"adapter {name!r} has modules_to_save {list(config.modules_to_save)}: several named "
                             f"adapters need adapters without them (each would need its own copy of the module)")
        if is_pissa(config.init):
            raise UserError(f"adapter {name!r} is PiSSA, which rewrote the shared base weights; save_adapter it "
                             f"(that converts it to plain LoRA) and load the saved adapter instead")


def add_adapter(model, name, config):
    """Add a fresh adapter `name` (initialized as config.init says) beside the others; the active one stays active.
    Returns the new adapter's {module name: LoRALinear}."""
    registry = _registry(model)
    if name in registry:
        raise UserError(f"an adapter named {name!r} already exists; pick another name or delete_adapter it first")
    _check_combinable({**{n: a["config"] for n, a in registry.items()}, name: config})
    _check_can_switch(model, "add_adapter")
    active = model.active_adapter
    _swap_in(model, {})  # the bare base model, for apply_lora
    del model.lora_config
    try:
        apply_lora(model, config)
        registry[name] = {"config": model.lora_config, "layers": dict(lora_layers(model))}
    finally:
        _swap_in(model, registry[active]["layers"])
        model.lora_config = registry[active]["config"]
        mark_only_lora_trainable(model)
    return registry[name]["layers"]


def delete_adapter(model, name):
    """Forget adapter `name`; the active adapter cannot be deleted (set_adapter to another one first)."""
    adapter_layers(model, name)
    if name == model.active_adapter:
        raise UserError(f"{name!r} is the active adapter; set_adapter(model, other) first, or remove_lora(model)")
    del model.lora_adapters[name]
    return model


# --- combining adapters ---------------------------------------------------------------------------------------

def _union_targets(targets):
    if all(isinstance(t, str) for t in targets):
        return "|".join(f"({t})" for t in targets)  # regexes: either one
    if any(isinstance(t, str) for t in targets):
        raise UserError("add_weighted_adapter: the adapters' targets mix regexes and lists of names; PEFT refuses "
                         "that too. Give them targets of one kind")
    return tuple(dict.fromkeys(t for ts in targets for t in ts))  # names: all of them, in order


@torch.no_grad()
def add_weighted_adapter(model, adapters, weights, adapter_name, combination_type="linear"):
    """A new adapter `adapter_name` combining `adapters` with `weights` (PEFT's 'linear' or 'cat', see above)."""
    registry = _registry(model)
    if len(adapters) != len(weights) or not adapters:
        raise UserError(f"add_weighted_adapter: {len(adapters)} adapters and {len(weights)} weights; give one "
                         f"weight per adapter")
    for a in adapters:
        adapter_layers(model, a)  # a clear error for an unknown name
    configs = {a: registry[a]["config"] for a in adapters}
    dora = [a for a, c in configs.items() if c.use_dora]
    if dora:
        raise UserError(f"add_weighted_adapter: {dora} are DoRA adapters; their magnitude vectors cannot be "
                         f"combined. Merge them one at a time instead (set_adapter, merge_and_unload)")
    if combination_type not in ("linear", "cat"):
        raise UserError(f"combination_type must be 'linear' or 'cat', got {combination_type!r}")
    ranks = {c.r for c in configs.values()}
    if combination_type == "linear" and len(adapters) > 1 and len(ranks) > 1:
        raise UserError(f"combination_type='linear' needs adapters of one rank, got r={sorted(ranks)}; "
                         f"use combination_type='cat'")
    new_r = sum(c.r for c in configs.values()) if combination_type == "cat" and len(adapters) > 1 else ranks.pop()
    first = configs[adapters[0]]
    config = replace(first, r=new_r, alpha=new_r, targets=_union_targets([c.targets for c in configs.values()]),
                     init="kaiming", mode=first.mode)
    new_layers = add_adapter(model, adapter_name, config)
    for name, layer in new_layers.items():
        sources = [(adapter_layers(model, a)[name], w) for a, w in zip(adapters, weights)
                   if name in adapter_layers(model, a)]
        layer.lora_A.zero_()
        layer.lora_B.zero_()
        if combination_type == "cat" and len(adapters) > 1:
            A = torch.cat([w * src.scaling * src.lora_A for src, w in sources], dim=0)  # (sum r_i, in)
            B = torch.cat([src.lora_B for src, _ in sources], dim=1)  # (out, sum r_i)
            layer.lora_A[: A.shape[0]] = A  # a layer only some adapters target keeps zero rows after theirs
            layer.lora_B[:, : B.shape[1]] = B
        else:
            for src, w in sources:  # sqrt(|w s|) on both sides, the sign on A only
                ws = w * src.scaling
                layer.lora_A += (1 if ws >= 0 else -1) * abs(ws) ** 0.5 * src.lora_A
                layer.lora_B += abs(ws) ** 0.5 * src.lora_B
    return model
