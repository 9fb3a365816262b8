"""Seeing what LoRA did to a model: parameter counts (PEFT's exact line) and a compact module tree.

    >>> print_trainable_parameters(model)
    trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364
    >>> print(summary(model))
    GPT  124.73M params, 294.91K trainable
      transformer  ModuleDict
        wte  Embedding(50257, 768)
        wpe  Embedding(1024, 768)
        h  ModuleList
          0-11  Block  x12
            ln_1  LayerNorm(768)
            attn  CausalSelfAttention
              c_attn  LoRA(768 -> 2304, r=8, alpha=16, split)  * trainable: lora_A, lora_B
              c_proj  Linear(768 -> 768)
            ln_2  LayerNorm(768)
            mlp  MLP
              c_fc  Linear(768 -> 3072)
              c_proj  Linear(3072 -> 768)
        ln_f  LayerNorm(768)
      lm_head  Linear(768 -> 50257, no bias)  tied to transformer.wte.weight

Modules without parameters (Dropout, GELU) are left out, and so are a LoRA layer's insides.

Counts follow PEFT's get_nb_trainable_parameters: every distinct Parameter once (a tied lm_head/wte weight counts
once). PEFT's modules_to_save keep a frozen original next to the trainable copy, so PEFT's "all params" is larger by
those modules' size; ours train in place and are counted once.
"""
import torch.nn as nn

from lora.layer import LoRALinear
from quant import quantized_bytes


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) over distinct parameters; a quantized weight (quant/quantize.py) counts its (out, in) weights."""
    params = list(model.parameters())  # .parameters() already yields a shared Parameter once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized_bytes(model)[1]


def print_trainable_parameters(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    print(line)
    return line


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _describe(module: nn.Module) -> str:
    """One short description of a module: its class, plus shapes for the common leaves."""
    if hasattr(module, "describe"):  # a prompt encoder (prompts/) says what it is
        return module.describe()
    if isinstance(module, LoRALinear):
        state = "merged" if module.merged else ("disabled" if not module.enabled else module.mode)
        return (f"LoRA({module.in_features} -> {module.out_features}, r={module.r}, alpha={module.lora_alpha:g}"
                f"{', rslora' if module.rslora else ''}, {state})")
    if isinstance(module, nn.Linear):
        return f"Linear({module.in_features} -> {module.out_features}{'' if module.bias is not None else ', no bias'})"
    if isinstance(module, nn.Embedding):
        return f"Embedding({module.num_embeddings}, {module.embedding_dim})"
    if isinstance(module, nn.LayerNorm):
        return f"LayerNorm({', '.join(map(str, module.normalized_shape))})"
    own = [f"{n}{tuple(p.shape)}" for n, p in module.named_parameters(recurse=False)]
    return type(module).__name__ + (f"({', '.join(own)})" if own else "")


def _signature(module: nn.Module):
    """Structure of a subtree (classes, parameter shapes, trainability, LoRA state): equal means 'repeat'."""
    own = tuple((n, tuple(p.shape), p.requires_grad) for n, p in module.named_parameters(recurse=False))
    lora = (module.r, module.lora_alpha, module.mode, module.merged, module.enabled) \
        if isinstance(module, LoRALinear) else None
    return (type(module).__name__, own, lora, tuple((n, _signature(c)) for n, c in module.named_children()))


def summary(model: nn.Module) -> str:
    """The module tree, one line per module with parameters; identical consecutive numbered children (the
    blocks of a ModuleList) collapse to 'i-j'. LoRA layers show r/alpha/mode; '*' marks trainable tensors."""
    tied_names = {}  # parameter id -> its first qualified name, to point at ties
    for name, p in model.named_parameters(remove_duplicate=False):
        tied_names.setdefault(id(p), name)
    trainable, total = count_parameters(model)
    lines = [f"{type(model).__name__}  {_human(total)} params, {_human(trainable)} trainable"]
    _walk(model, "", 1, tied_names, lines)
    return "\n".join(lines)


def _walk(module, prefix, depth, tied_names, lines):
    children = list(module.named_children())
    i = 0
    while i < len(children):
        name, child = children[i]
        if not any(True for _ in child.parameters()):  # Dropout, GELU, Identity: nothing to show
            i += 1
            continue
        j = i + 1  # extend a run of numbered children with the same structure
        if name.isdigit():
            sig = _signature(child)
            while j < len(children) and children[j][0].isdigit() and _signature(children[j][1]) == sig:
                j += 1
        label = name if j == i + 1 else f"{name}-{children[j - 1][0]}"
        qualified = f"{prefix}{name}"
        notes = []
        own = list(child.named_parameters(recurse=False))
        train = [n for n, p in own if p.requires_grad]
        if train:
            notes.append("* trainable: " + ", ".join(train))
        for n, p in own:
            first = tied_names.get(id(p))
            if first is not None and first != f"{qualified}.{n}":
                notes.append(f"tied to {first}")
        count = f"  x{j - i}" if j > i + 1 else ""
        lines.append("  " * depth + f"{label}  {_describe(child)}{count}" + ("  " + "  ".join(notes) if notes else ""))
        if not isinstance(child, LoRALinear):
            _walk(child, qualified + ".", depth + 1, tied_names, lines)
        i = j
