"""Training checkpoints (out_dir/ckpt.pt) and loading any model spec a user may pass.

A checkpoint is one torch.save'd dict of tensors and plain Python values, loaded back with
`torch.load(weights_only=True)` (no pickled classes, so nothing in it can run code):
    model        full state dict, or for an adapter run only the adapter's tensors (LoRA: plus modules_to_save)
    model_type   a key of model.MODELS ('gpt2', 'llama');  model_args: the model's config dataclass as a dict
    peft         {"method": adapters.METHODS entry, "config": its config as a dict}, or None (full weights)
    lora         a LoRA run's config again (what older checkpoints have instead of peft), or None
    base         the model the run started from (None: scratch), which for an adapter run is its frozen base
    allocator    AdaLoRA's importance averages (AdaLoRA runs)
    optimizer    AdamW state;  step: the next step to run;  config: the training config
    loader       the data loader's {"shard", "position"}
    rng          one {torch, cuda, python} RNG state per DDP rank, so that every rank's dropout continues
                 exactly where it stopped
"""
import os
import random
from pathlib import Path

import torch

from atomic import atomic_path
from model import build_model, load_pretrained

CKPT_NAME = "ckpt.pt"


def rng_state(device="cpu"):
    """This process's RNG states: CPU torch, Python's random, and the CUDA generator of `device` if it is a GPU."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if str(device).startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(states, rank=0, device="cpu"):
    """Restore this rank's entry of the per-rank list that save_checkpoint wrote."""
    state = states[rank]
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(out_dir, model, optimizer, step, config, loader_state, base=None, rng_states=None, extra=None):
    """Write out_dir/ckpt.pt atomically: a crash mid-save leaves the previous checkpoint intact.

    rng_states: one rng_state(device) per DDP rank, gathered by the caller; None means this process's CPU RNG.
    extra: more entries for the dict (AdaLoRA's rank allocator state)."""
    from adapters import checkpoint_entry, trainable_state_dict
    peft = checkpoint_entry(model)  # None for a model without an adapter
    if peft is None:
        model_sd = model.state_dict()
    elif peft["method"] == "lora":
        from lora import lora_state_dict
        model_sd = lora_state_dict(model)  # lora_A, lora_B and modules_to_save
    else:
        model_sd = trainable_state_dict(model)
    checkpoint = {
        "model": model_sd, "model_type": model.model_type, "model_args": model.config_dict(),
        "lora": peft["config"] if peft and peft["method"] == "lora" else None, "peft": peft, "base": base,
        "optimizer": optimizer.state_dict(), "step": step,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "loader": loader_state, "rng": rng_states if rng_states is not None else [rng_state()], **(extra or {}),
    }
    with atomic_path(Path(out_dir) / CKPT_NAME) as tmp:
        torch.save(checkpoint, tmp)


def read_checkpoint(path):
    path = Path(path)
    if path.is_dir():
        path = path / CKPT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train with out_dir={path.parent} first "
                                f"(init_from='resume' continues a run that saved one)")
    return torch.load(path, map_location="cpu", weights_only=True)


def model_from_checkpoint(checkpoint, dtype=None, **overrides):
    """The trained model a checkpoint describes: full weights, or its base with the adapter's tensors applied.
    `overrides` may set dropout."""
    peft = checkpoint.get("peft") or ({"method": "lora", "config": checkpoint["lora"]} if checkpoint["lora"] else None)
    if peft is None:
        model = build_model(checkpoint["model_type"], {**checkpoint["model_args"], **overrides})
        model.load_state_dict(checkpoint["model"])
    else:
        from adapters import from_checkpoint_entry, trainable_state_dict
        model = from_checkpoint_entry(load_model(checkpoint["base"], **overrides), peft)
        _, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
        missing = sorted(set(trainable_state_dict(model)) - set(checkpoint["model"]))  # the adapter's own tensors
        if unexpected or missing:
            raise ValueError(f"{peft['method']} checkpoint does not fit its base {checkpoint['base']}: "
                             f"unexpected {unexpected[:4]}, missing {missing[:4]}")
    if dtype is not None:
        model.to(dtype)
    return model


def load_model(spec, base=None, dtype=None, **overrides):
    """Any model a user may name, on the CPU:
    - a training out_dir (or its ckpt.pt)           -> the model it trained (adapter runs: base + adapter)
    - a folder with adapter_config.json             -> its base (`base` or base_model_name_or_path) + adapter
                                                       (LoRA, AdaLoRA, prompt, P-tuning or prefix tuning)
    - a Hugging Face folder or cached hub name      -> the class model.MODELS has for its model_type
    `overrides` may set dropout, whatever the model's own config says.
    """
    path = Path(os.fspath(spec)).expanduser()
    if (path.is_dir() and (path / CKPT_NAME).is_file()) or (path.is_file() and path.suffix == ".pt"):
        return model_from_checkpoint(read_checkpoint(path), dtype, **overrides)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        import json
        from adapters import load_adapter
        with open(path / "adapter_config.json") as f:
            base = base or json.load(f).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{path}: adapter_config.json names no base_model_name_or_path; pass the base model")
        model = load_model(base, dtype=dtype, **overrides)
        load_adapter(model, path)
        return model
    return load_pretrained(spec, dtype=dtype, **overrides)
