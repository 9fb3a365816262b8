"""Finding modules in any model by name: what LoRA, quantization and the PEFT methods share, owned by none of them;
and project(), the one call through which a model runs several layers on the same input.

    name_matches(name, targets)   PEFT's rule: a str is a regex over the whole name; a tuple matches a name or .-suffix
    collapse_names(names)         h.0.attn.c_attn, h.1.attn.c_attn, ... -> h.[0-1].attn.c_attn (for messages)
    tied_owners(model)            which modules hold each parameter (two owners: a tied weight)
    project(x, layers)            [layer(x) for layer in layers], grouped where the layers' type offers it
"""
import re


def name_matches(name: str, targets) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list matches a full name or a '.'-suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def collapse_names(names) -> list[str]:
    """['h.0.attn.c_attn', 'h.1.attn.c_attn', ...] -> ['h.[0-11].attn.c_attn'] (first numeric part only)."""
    groups = {}  # pattern -> sorted layer indices, in order of first appearance
    for name in names:
        parts = name.split(".")
        i = next((k for k, p in enumerate(parts) if p.isdigit()), None)
        if i is None:
            groups.setdefault(name, [])
            continue
        key = ".".join(parts[:i] + ["{}"] + parts[i + 1:])
        groups.setdefault(key, []).append(int(parts[i]))
    out = []
    for key, idx in groups.items():
        if not idx:
            out.append(key)
            continue
        idx = sorted(set(idx))
        contiguous = idx == list(range(idx[0], idx[-1] + 1))
        label = (f"{idx[0]}" if len(idx) == 1 else f"[{idx[0]}-{idx[-1]}]" if contiguous
                 else "[" + ",".join(map(str, idx)) + "]")
        out.append(key.replace("{}", label, 1))
    return out


def tied_owners(model):
    """id(parameter) -> names of the modules holding it directly; more than one name means a tied weight."""
    owners = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    return owners


def project(x, layers):
    """[layer(x) for layer in layers]: several projections of the same x (LLaMA's q/k/v).

    The protocol, so that model/ knows nothing of what wraps a layer: layers whose type offers a static
    `group_forward(x, layers)` (returning their outputs in order) are handed to it together, in one call per
    such function, and may share work (a LoRA layer's group_forward computes the down-projections of q, k and v
    as one GEMM, lora/grouped.py); every other layer (an nn.Linear) runs on its own."""
    outs, groups = [None] * len(layers), {}
    for i, layer in enumerate(layers):
        fn = getattr(type(layer), "group_forward", None)
        if fn is None:
            outs[i] = layer(x)
        else:
            groups.setdefault(fn, []).append(i)
    for fn, idx in groups.items():
        for i, out in zip(idx, fn(x, [layers[i] for i in idx])):
            outs[i] = out
    return outs
