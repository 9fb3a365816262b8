"""Training checkpoints (out_dir/ckpt.pt) and loading any model spec a user may pass.

A checkpoint is one torch.save'd dict of tensors and plain Python values, loaded back with
`torch.load(weights_only=True)` (no pickled classes, so nothing in it can run code):
    model        full state dict, or for a LoRA run only the LoRA tensors (plus modules_to_save)
    model_type   a key of model.MODELS ('gpt2', 'llama');  model_args: the model's config dataclass as a dict
    lora         the LoRAConfig as a dict, or None;  base: the model the run started from (None: scratch), which
                 for a LoRA run is its frozen base
    base_fingerprint  a LoRA run's fingerprint(base) when it started: loading it on another base is refused
    optimizer    AdamW state;  step: the next step to run;  config: the training config
    loader       the data loader's {"shard", "position"}
    rng          one {torch, cuda, python} RNG state per DDP rank, so that every rank's dropout continues
                 exactly where it stopped
"""
import dataclasses
import hashlib
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


def fingerprint(model):
    """A short hash of a model's weights: every tensor's name, shape and dtype, and 16 of its values spread over it.

    Enough to tell a LoRA run's base from another model, even one of the same shape (a retrained base, another
    out_dir), without reading every byte of a large model twice."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 16)][:16].float().cpu()  # (<= 16,)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(out_dir, model, optimizer, step, config, loader_state, lora_config=None, base=None,
                    rng_states=None, base_fingerprint=None):
    """Write out_dir/ckpt.pt atomically: a crash mid-save leaves the previous checkpoint intact.

    rng_states: one rng_state(device) per DDP rank, gathered by the caller; None means this process's CPU RNG."""
    if lora_config is not None:
        from lora import lora_state_dict
        model_sd = lora_state_dict(model)
        lora = dataclasses.asdict(lora_config)
    else:
        model_sd = model.state_dict()
        lora = None
    checkpoint = {
        "model": model_sd, "model_type": model.model_type, "model_args": model.config_dict(),
        "lora": lora, "base": base, "base_fingerprint": base_fingerprint,
        "optimizer": optimizer.state_dict(), "step": step,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "loader": loader_state, "rng": rng_states if rng_states is not None else [rng_state()],
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
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: torch's message is long and suggests unsafe loading
        reason = str(e).split(". ")[0]
        raise ValueError(f"{path} is not a readable checkpoint ({reason}): the file is truncated or not one of "
                         f"train.py's; delete it and train again, or point at another checkpoint") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} is not one of train.py's checkpoints (it holds a {type(checkpoint).__name__})")
    checkpoint["path"] = str(path)  # where it came from, for messages
    return checkpoint


def model_from_checkpoint(checkpoint, dtype=None, **overrides):
    """The trained model a checkpoint describes: full weights, or its base with the LoRA tensors applied.
    `overrides` may set dropout."""
    missing = {"model", "model_type", "model_args", "lora", "base"} - set(checkpoint)
    if missing:
        raise ValueError(f"{checkpoint.get('path', 'checkpoint')} is not one of train.py's checkpoints (no "
                         f"{', '.join(sorted(missing))})")
    if checkpoint["lora"] is None:
        model = build_model(checkpoint["model_type"], {**checkpoint["model_args"], **overrides})
        model.load_state_dict(checkpoint["model"])
    else:
        from lora import LoRAConfig, apply_lora
        where, base = checkpoint.get("path", "the checkpoint"), checkpoint["base"]
        if os.path.exists(base) and Path(where).parent.resolve() in (Path(base).resolve(),
                                                                    Path(base).resolve().parent):
            raise ValueError(f"{where}: a LoRA checkpoint whose base is its own out_dir {base} (its base was "
                             f"overwritten by it); the base model is gone: train the LoRA run again on its base")
        model = load_base(base, **overrides)
        expected, found = checkpoint.get("base_fingerprint"), fingerprint(model)
        if expected is not None and expected != found:
            raise ValueError(f"{where}: its base {base} has changed since this LoRA run started (fingerprint "
                             f"{found}, the run's was {expected}): the adapter was trained on other weights. Restore "
                             f"that base, or start a new LoRA run on the current one")
        lora = dict(checkpoint["lora"])
        for key in ("targets", "modules_to_save"):
            if isinstance(lora.get(key), list):
                lora[key] = tuple(lora[key])
        apply_lora(model, LoRAConfig(**lora))
        missing, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
        if unexpected or any(".lora_" in k for k in missing):
            raise ValueError(f"LoRA checkpoint does not fit its base {checkpoint['base']}: "
                             f"unexpected {unexpected[:4]}, missing {[k for k in missing if '.lora_' in k][:4]}")
    if dtype is not None:
        model.to(dtype)
    return model


def load_base(spec, **overrides):
    """load_model(spec) as a plain model to build on: a LoRA run's base and adapter merged into one set of
    weights, every parameter trainable (apply_lora and full fine-tuning both start from it)."""
    from lora import lora_layers, merge_and_unload
    model = load_model(spec, **overrides)
    if lora_layers(model):
        print(f"{spec} is a LoRA run: building on its merged weights (base + scaling * B @ A)")
        merge_and_unload(model)
        model.requires_grad_(True)
    return model


def load_model(spec, base=None, dtype=None, **overrides):
    """Any model a user may name, on the CPU:
    - a training out_dir (or its ckpt.pt)           -> the model it trained (LoRA runs: base + adapter)
    - a folder with adapter_config.json             -> its base (`base` or base_model_name_or_path) + adapter
    - a Hugging Face folder or cached hub name      -> the class model.MODELS has for its model_type
    `overrides` may set dropout, whatever the model's own config says.
    """
    path = Path(os.fspath(spec)).expanduser()
    if (path.is_dir() and (path / CKPT_NAME).is_file()) or (path.is_file() and path.suffix == ".pt"):
        return model_from_checkpoint(read_checkpoint(path), dtype, **overrides)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        import json
        from lora import load_adapter
        with open(path / "adapter_config.json") as f:
            base = base or json.load(f).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{path}: adapter_config.json names no base_model_name_or_path; pass the base model")
        model = load_model(base, dtype=dtype, **overrides)
        load_adapter(model, path)
        return model
    return load_pretrained(spec, dtype=dtype, **overrides)
