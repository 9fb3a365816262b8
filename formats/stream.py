"""A Hugging Face checkpoint read one tensor at a time, for a model built on the meta device (quant/quantize.py).

    model, tensors, describe = meta_model_and_hf_tensors("path/to/hf-folder")
    for name, tensor in tensors: ...            # our names, our (out, in) layout

The model has the checkpoint's architecture but no memory (every tensor on "meta"); the tensors come lazily from
safetensors files (safe_open reads one tensor per get_tensor) or a memory-mapped pytorch_model.bin, so only the
tensor being handled is in memory.
"""
import importlib
import json
from pathlib import Path

import torch
from safetensors import safe_open

from model import model_class
from model.hf import load_hf_config, resolve_model_dir
from tools.errors import UserError


def hf_tensors(model_dir):
    """(name, tensor) of every tensor in a Hugging Face folder, one at a time, as stored."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    elif index.is_file():
        files = [model_dir / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    elif (model_dir / "pytorch_model.bin").is_file():  # mmap: tensors are read from disk as they are used
        yield from torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True,
                              mmap=True).items()
        return
    else:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors, model.safetensors.index.json or "
                                f"pytorch_model.bin")
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{model_dir}: shard {path.name} named in the index is missing")
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def meta_model_and_hf_tensors(spec, **overrides):
    """(model on the meta device, iterator of (our name, tensor), a description for messages) for a Hugging Face
    folder (or cached hub name) of any family in model.MODELS. Each family's file has the two functions its own
    from_pretrained uses: config_from_hf(hf) -> config kwargs, and tensor_from_hf(name, tensor, config) -> (our
    name, tensor in our layout) or None for a tensor we do not keep. `overrides` may set dropout."""
    model_dir = resolve_model_dir(spec)
    hf = load_hf_config(model_dir)
    try:
        cls = model_class(hf.get("model_type"))
        family = importlib.import_module(cls.__module__)  # model.gpt, model.llama
        unknown = set(overrides) - {"dropout"}
        if unknown:
            raise UserError(f"only dropout can be overridden, got {sorted(unknown)}")
        config = cls.config_class(**{**family.config_from_hf(hf), **overrides})
    except ValueError as e:
        raise UserError(f"{model_dir}: {e}") from None
    with torch.device("meta"):
        model = cls(config)  # a tied lm_head is the embedding's tensor, here too
    tensors = (t for t in (family.tensor_from_hf(k, v, config) for k, v in hf_tensors(model_dir)) if t)
    return model, tensors, str(model_dir)
