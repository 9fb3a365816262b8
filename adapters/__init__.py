"""Every fine-tuning method behind one table: METHODS, train.py's `peft_method` -> its row (adapters/method.py).

    method     what trains                                    where           PEFT peft_type
    full       every weight (full fine-tuning)                -               -
    lora       B A on the target Linears                      lora/           LORA
    adalora    P diag(lambda) Q, ranks pruned while training  lora/adalora.py ADALORA
    prompt     n input embeddings                             prompts/        PROMPT_TUNING
    ptuning    n input embeddings from an MLP / LSTM          prompts/        P_TUNING
    prefix     n keys/values per layer                        prompts/        PREFIX_TUNING

A new method is one file with its row and one entry below. train.py, training/checkpoint.py and the settings
checks (training/validate.py) reach a method only through its row.
"""
import dataclasses
import json
from pathlib import Path

from adapters.adalora import ADALORA
from adapters.full import FULL
from adapters.lora import LORA
from adapters.method import CAPABILITIES, Method
from adapters.prompt import PREFIX, PROMPT, PTUNING
from tools.errors import UserError

METHODS = {m.name: m for m in (FULL, LORA, ADALORA, PROMPT, PTUNING, PREFIX)}


def method(name):
    if name not in METHODS:
        raise UserError(f"peft_method={name!r}: use one of {', '.join(map(repr, METHODS))}")
    return METHODS[name]


def method_of(model):
    """The row of the method `model` carries (FULL when it carries none)."""
    return next((m for m in METHODS.values() if m.attribute and m.attached(model)), FULL)


def apply(model, name, settings, encode=None, **kwargs):
    """Put method `name`, configured by train.py's `settings`, into `model` (in place); returns the model."""
    row = method(name)
    return row.apply(model, row.config(settings), encode, **kwargs)


def trainable_state_dict(model):
    """The trainable tensors, by state-dict name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_entry(model):
    """{'method', 'config'} for ckpt.pt (plain values only), or None for a model without an adapter."""
    row = method_of(model)
    if row is FULL:
        return None
    config = dataclasses.asdict(row.config_of(model))
    return {"method": row.name, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}


def from_checkpoint_entry(model, entry, state):
    """Re-apply a checkpoint_entry() to its rebuilt base; `state` is the checkpoint's model tensors, which the
    caller loads afterwards (a row may need some of them first: PiSSA's A0, B0)."""
    row = method(entry["method"])
    return row.restore(model, row.config_from_dict(entry["config"]), state)


def save_adapter(model, path, base_model_name_or_path=None, state=None):
    """The adapter folder (PEFT format) of whatever method `model` carries."""
    return method_of(model).save(model, path, base_model_name_or_path, state=state)


def load_adapter(model, path):
    """Load any PEFT adapter folder we implement into `model` (its base), chosen by adapter_config's peft_type."""
    config_path = Path(path) / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: no adapter_config.json; expected a PEFT adapter folder")
    peft_type = json.loads(config_path.read_text()).get("peft_type")
    rows = {m.peft_type: m for m in METHODS.values() if m.peft_type}
    if peft_type not in rows:
        raise UserError(f"{path}: peft_type={peft_type!r} is not supported ({', '.join(rows)})")
    return rows[peft_type].load(model, path)


__all__ = ["METHODS", "FULL", "CAPABILITIES", "Method", "method", "method_of", "apply", "trainable_state_dict",
           "checkpoint_entry", "from_checkpoint_entry", "save_adapter", "load_adapter"]
