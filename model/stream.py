"""A Hugging Face checkpoint read one tensor at a time, for a model built on the meta device (model/quant.py).

    model, tensors, describe = meta_model_and_hf_tensors("path/to/hf-folder")
    for name, tensor in tensors: ...            # our names, our (out, in) layout

The model has the checkpoint's architecture but no memory (every tensor on "meta"); the tensors come lazily from
safetensors files (safe_open reads one tensor per get_tensor) or a memory-mapped pytorch_model.bin, so only the
tensor being handled is in memory.
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open

from .gpt import GPT, GPTConfig, config_from_hf as gpt_config_from_hf, tensor_from_hf as gpt_tensor_from_hf
from .hf import load_hf_config, resolve_model_dir
from .llama import LLaMA, LLaMAConfig, config_from_hf as llama_config_from_hf


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


def meta_model_and_hf_tensors(spec):
    """(model on the meta device, iterator of (our name, tensor), a description for messages) for a Hugging Face
    GPT-2 or LLaMA folder (or cached hub name): the tensors in our names and our (out, in) layout."""
    model_dir = resolve_model_dir(spec)
    hf = load_hf_config(model_dir)
    if hf.get("model_type") == "gpt2":
        with torch.device("meta"):
            model = GPT(GPTConfig(**gpt_config_from_hf(hf, model_dir)))
        tensors = (t for t in (gpt_tensor_from_hf(k, v) for k, v in hf_tensors(model_dir)) if t)
    elif hf.get("model_type") == "llama":
        with torch.device("meta"):
            model = LLaMA(LLaMAConfig(**llama_config_from_hf(hf)))  # a tied lm_head is embed_tokens' tensor
        tied = model.config.tie_word_embeddings
        tensors = ((k, v) for k, v in hf_tensors(model_dir)
                   if not k.endswith("rotary_emb.inv_freq") and not (tied and k == "lm_head.weight"))
    else:
        raise ValueError(f"{model_dir}: model_type {hf.get('model_type')!r} is not supported (gpt2 or llama)")
    return model, tensors, str(model_dir)
