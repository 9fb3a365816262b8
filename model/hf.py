"""Reading (and writing) Hugging Face model folders, without transformers.

A Hugging Face checkpoint folder holds `config.json` and the weights in one of three layouts:
    model.safetensors                                  one file
    model.safetensors.index.json + model-0000k-of-n    sharded (large models); the index maps name -> file
    pytorch_model.bin                                  older pickled checkpoints
We read safetensors directly and the .bin only with `torch.load(weights_only=True)`, which refuses
anything but tensors and plain containers, so a malicious checkpoint cannot run code.
"""
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tools.atomic import atomic_path
from tools.errors import UserError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def resolve_model_dir(name_or_path):
    """A local folder, or a hub name like "gpt2" looked up in the local Hugging Face cache.

    If the name is not cached and `huggingface_hub` is installed, it is downloaded (needs network).
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{name_or_path!r} is a file; expected a Hugging Face model folder "
                                 f"(config.json + model.safetensors)")
    looks_like_hub_name = str(name_or_path).count("/") <= 1 and not str(name_or_path).startswith((".", "~"))
    if looks_like_hub_name:
        cached = _find_in_hf_cache(str(name_or_path))
        if cached is not None:
            return cached
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            snapshot_download = None
        if snapshot_download is not None:
            try:
                return Path(snapshot_download(str(name_or_path),
                                              allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
            except Exception as e:  # offline, unknown name, gated repo ...
                raise FileNotFoundError(f"model {name_or_path!r}: no local folder of that name, not in the "
                                        f"Hugging Face cache, and the download failed ({e})") from e
    raise FileNotFoundError(f"model {name_or_path!r}: no such folder, and not in the Hugging Face cache "
                            f"({_hf_cache_dir()}). Pass a folder with config.json + model.safetensors, or "
                            f"`pip install huggingface_hub` to download hub names.")


def _hf_cache_dir():
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return hf_home / "hub"


def _find_in_hf_cache(name):
    # cache layout: hub/models--{org}--{name}/snapshots/{commit}/..., refs/main holds the commit
    repo = _hf_cache_dir() / ("models--" + name.replace("/", "--"))
    if not repo.is_dir() and "/" not in name:  # "gpt2" now lives at "openai-community/gpt2"
        repo = _hf_cache_dir() / ("models--openai-community--" + name)
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def read_json(path):
    """A JSON object from `path`; a ValueError naming the file if it is not one (binary, truncated, a list ...)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a JSON file ({e}): restore or re-export it") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object {{...}}, found a {type(value).__name__}")
    return value


def read_safetensors(path):
    """All tensors of a .safetensors file; a ValueError naming the file if it is truncated or not safetensors."""
    try:
        return load_file(path)
    except Exception as e:  # safetensors' own error type, or an OSError from a file cut short
        raise UserError(f"{path} is not a readable safetensors file ({e}): it is truncated or corrupt; "
                         f"write or download it again") from None


def read_torch_weights(path):
    """A pickled state dict (pytorch_model.bin, adapter_model.bin) through the restricted unpickler."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable weights file ({str(e).split('. ')[0]}): it is truncated, "
                         f"corrupt or holds more than tensors; write or download it again") from None


def load_hf_config(model_dir):
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a Hugging Face model folder")
    return read_json(path)


def load_hf_state_dict(model_dir):
    """All tensors of the checkpoint in `model_dir`, by name, as stored (dtype unchanged)."""
    model_dir = Path(model_dir)
    if (model_dir / "model.safetensors").is_file():
        return read_safetensors(model_dir / "model.safetensors")
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")  # tensor name -> shard file name
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no \"weight_map\" object; not a safetensors index")
        state_dict = {}
        for shard in sorted(set(weight_map.values())):
            if not (model_dir / shard).is_file():
                raise FileNotFoundError(f"{model_dir}: shard {shard} named in {index.name} is missing")
            state_dict.update(read_safetensors(model_dir / shard))
        return state_dict
    if (model_dir / "pytorch_model.bin").is_file():
        return read_torch_weights(model_dir / "pytorch_model.bin")
    raise FileNotFoundError(f"{model_dir}: no weights found; expected one of {', '.join(WEIGHT_FILES)}")


def save_hf_folder(model_dir, config, state_dict):
    """Write config.json + model.safetensors (atomically). Tied tensors must be deduplicated by the caller."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    with atomic_path(model_dir / "model.safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with atomic_path(model_dir / "config.json") as tmp:
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2)


def check_keys(model_name, expected, found, ignore=()):
    """Raise a clear error listing missing and unexpected tensor names (a few of each)."""
    expected, found = set(expected), {k for k in found if not any(s in k for s in ignore)}
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        lines = [f"{model_name}: checkpoint does not match the model."]
        if missing:
            lines.append(f"  missing ({len(missing)}): {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {', '.join(unexpected[:6])}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
        raise UserError("\n".join(lines))
