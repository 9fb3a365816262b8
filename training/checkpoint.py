"""Training checkpoints (out_dir/ckpt.pt) and loading any model spec a user may pass.

A checkpoint is one torch.save'd dict of tensors and plain Python values, loaded back with
`torch.load(weights_only=True)` (no pickled classes, so nothing in it can run code):
    model        full state dict, or for an adapter run only the adapter's tensors (LoRA: plus modules_to_save)
    model_type   a key of model.MODELS ('gpt2', 'llama', 'gemma3_text');  model_args: the model's config dataclass as a dict
    peft         {"method": a key of adapters.METHODS, "config": its config as a dict}, or None (full weights)
    lora         a LoRA run's config again (what older checkpoints have instead of peft), or None
    base         the model the run started from (None: scratch), which for an adapter run is its frozen base
    base_fingerprint  an adapter run's fingerprint(base) when it started: loading it on another base is refused
    allocator    AdaLoRA's importance averages (AdaLoRA runs)
    optimizer    AdamW state, keyed by parameter name;  step: the next step to run;  config: the training config
    loader       the data loader's {"shard", "position"}
    rng          one {torch, cuda, python} RNG state per DDP rank, so that every rank's dropout continues
                 exactly where it stopped
A LoRA run on a quantized base (config["quantize"] = 'nf4' | 'int8') stores no quantized tensor: quantization is
deterministic, so loading re-quantizes the base and gets the very same packed weights.
"""
import hashlib
import os
import random
from pathlib import Path

import torch

from tools.atomic import atomic_path
from model import build_model, load_pretrained
from tools.errors import UserError

CKPT_NAME = "ckpt.pt"


def rng_state(device="cpu"):
    """This process's RNG states: CPU torch, Python's random, and the CUDA generator of `device` if it is a GPU."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if str(device).startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(states, rank=0, device="cpu", world_size=None, verbose=True):
    """Restore this rank's entry of the per-rank list that save_checkpoint wrote. A run with another number of
    processes than the checkpoint's restarts from seed + rank instead (and says so)."""
    if world_size is not None and len(states) != world_size:
        if verbose:
            print(f"the checkpoint has RNG states for {len(states)} process(es) and this run has {world_size}: the "
                  f"RNG restarts from seed + rank, so dropout will not repeat an uninterrupted run bit for bit")
        return
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


def save_checkpoint(out_dir, model, optimizer, step, config, loader_state, base=None, rng_states=None,
                    base_fingerprint=None, extra=None):
    """Write out_dir/ckpt.pt atomically: a crash mid-save leaves the previous checkpoint intact.

    model: the plain module, or the FSDP-sharded one (never a DDP wrapper). Under torch.distributed every rank
    calls this: FSDP's shards are gathered to rank 0, which writes; all return once the file is on disk. The file
    is the same whether one process, DDP or FSDP wrote it (optimizer state keyed by parameter name), so a run
    resumes under any of them. rng_states: one rng_state(device) per rank, gathered by the caller; None means
    this process's CPU RNG. extra: more entries for the dict (AdaLoRA's rank allocator state)."""
    import torch.distributed as dist
    from adapters import checkpoint_entry, method_of
    from training.parallel import gather_state, is_rank0, optimizer_state
    peft = checkpoint_entry(model)  # None for a model without an adapter
    state = method_of(model).state_dict(model, model.state_dict())  # FSDP: filtered before anything is gathered
    model_sd, optim_sd = gather_state(state), optimizer_state(model, optimizer)
    if is_rank0():
        checkpoint = {
            "model": model_sd, "model_type": model.model_type, "model_args": model.config_dict(),
            "lora": peft["config"] if peft and peft["method"] == "lora" else None, "peft": peft, "base": base,
            "base_fingerprint": base_fingerprint, "optimizer": optim_sd, "step": step,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
            "loader": loader_state, "rng": rng_states if rng_states is not None else [rng_state()], **(extra or {}),
        }
        with atomic_path(Path(out_dir) / CKPT_NAME) as tmp:
            torch.save(checkpoint, tmp)
    if dist.is_initialized():
        dist.barrier()  # no rank goes on (or exits) before the file is whole


def read_checkpoint(path):
    path = Path(path)
    if path.is_dir():
        path = path / CKPT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train with out_dir={path.parent} first "
                                f"(init_from='resume' continues a run that saved one)")
    try:  # mmap: tensors are read from disk when used, so a quantized load never holds the whole fp32 state dict
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated or foreign file: torch's message is long and suggests unsafe loading
        reason = str(e).split(". ")[0]
        raise UserError(f"{path} is not a readable checkpoint ({reason}): the file is truncated or not one of "
                         f"train.py's; delete it and train again, or point at another checkpoint") from None
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} is not one of train.py's checkpoints (it holds a {type(checkpoint).__name__})")
    checkpoint["path"] = str(path)  # where it came from, for messages
    return checkpoint


def model_from_checkpoint(checkpoint, dtype=None, quantize=None, **overrides):
    """The trained model a checkpoint describes: full weights, or its base with the adapter's tensors applied.
    `overrides` may set dropout. quantize: None = as the run trained (a QLoRA run's base is quantized again),
    '' = full precision, or 'nf4' | 'int8' (quant/quantize.py)."""
    missing = {"model", "model_type", "model_args", "lora", "base"} - set(checkpoint)
    if missing:
        raise UserError(f"{checkpoint.get('path', 'checkpoint')} is not one of train.py's checkpoints (no "
                         f"{', '.join(sorted(missing))})")
    if quantize is None:
        quantize = checkpoint["config"].get("quantize", "")
    peft = checkpoint.get("peft") or ({"method": "lora", "config": checkpoint["lora"]} if checkpoint["lora"] else None)
    if peft is None and quantize:
        from quant import fill_quantized
        with torch.device("meta"):  # no memory: the tensors arrive one by one, the Linear weights get quantized
            model = build_model(checkpoint["model_type"], {**checkpoint["model_args"], **overrides})
        model = fill_quantized(model, checkpoint["model"].items(), quantize, dtype=dtype, describe="checkpoint")
    elif peft is None:
        model = build_model(checkpoint["model_type"], {**checkpoint["model_args"], **overrides})
        model.load_state_dict(checkpoint["model"])
    else:
        from adapters import from_checkpoint_entry, trainable_state_dict
        where, base = checkpoint.get("path", "the checkpoint"), checkpoint["base"]
        if os.path.exists(base) and Path(where).parent.resolve() in (Path(base).resolve(),
                                                                    Path(base).resolve().parent):
            raise UserError(f"{where}: an adapter checkpoint whose base is its own out_dir {base} (its base was "
                             f"overwritten by it); the base model is gone: train the run again on its base")
        model = load_base(base, dtype=dtype, quantize=quantize, **overrides)
        expected, found = checkpoint.get("base_fingerprint"), fingerprint(model)
        if expected is not None and expected != found:
            kind = peft["method"]
            raise UserError(f"{where}: its base {base} has changed since this peft_method={kind!r} run started (fingerprint "
                             f"{found}, the run's was {expected}): the adapter was trained on other weights. Restore "
                             f"that base, or start a new run on the current one")
        model = from_checkpoint_entry(model, peft, checkpoint["model"])
        _, unexpected = model.load_state_dict(checkpoint["model"], strict=False)
        missing = sorted(set(trainable_state_dict(model)) - set(checkpoint["model"]))  # the adapter's own tensors
        if unexpected or missing:
            raise UserError(f"{peft['method']} checkpoint does not fit its base {checkpoint['base']}: "
                             f"unexpected {unexpected[:4]}, missing {missing[:4]}")
    if dtype is not None and not quantize:  # a quantized model was filled in `dtype` already
        model.to(dtype)
    return model


def load_base(spec, **kwargs):
    """load_model(spec, **kwargs) as a plain model to build on: a LoRA run's base and adapter merged into one set
    of weights, every parameter trainable (apply_lora and full fine-tuning both start from it)."""
    from lora import lora_layers, merge_and_unload
    model = load_model(spec, **kwargs)
    if lora_layers(model):
        print(f"{spec} is a LoRA run: building on its merged weights (base + scaling * B @ A)")
        merge_and_unload(model)
        model.requires_grad_(True)
    return model


def load_model(spec, base=None, dtype=None, quantize=None, **overrides):
    """Any model a user may name, on the CPU:
    - a training out_dir (or its ckpt.pt)           -> the model it trained (adapter runs: base + adapter)
    - a folder with adapter_config.json             -> its base (`base` or base_model_name_or_path) + adapter
                                                       (LoRA, AdaLoRA, prompt, P-tuning or prefix tuning)
    - a Hugging Face folder or cached hub name      -> the class model.MODELS has for its model_type
    - a .gguf file (llama.cpp)                      -> LLaMA or Gemma 3, dequantized (formats/gguf.py)
    `overrides` may set dropout, whatever the model's own config says.
    quantize: '' or None = full precision, except that None loads a QLoRA run's out_dir the way it trained;
    'nf4' | 'int8' quantizes the base's Linear layers while loading (quant/quantize.py), a .gguf's as a folder's.
    This is what a `--quantize` flag passes on (eval_hellaswag.py, sample.py).
    """
    if quantize:
        from quant import check_method
        check_method(quantize)
    path = Path(os.fspath(spec)).expanduser()
    if path.suffix == ".gguf":
        if quantize:  # each tensor dequantized from the file, then quantized again, one at a time
            from quant import load_quantized
            return load_quantized(path, quantize, dtype=dtype, **overrides)
        from formats.gguf import load_gguf
        return load_gguf(path, dtype, **overrides)
    if (path.is_dir() and (path / CKPT_NAME).is_file()) or (path.is_file() and path.suffix == ".pt"):
        return model_from_checkpoint(read_checkpoint(path), dtype, quantize, **overrides)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        import json
        from adapters import load_adapter
        with open(path / "adapter_config.json") as f:
            base = base or json.load(f).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{path}: adapter_config.json names no base_model_name_or_path; pass the base model")
        model = load_model(base, dtype=dtype, quantize=quantize or "", **overrides)
        load_adapter(model, path)
        return model
    if quantize:
        from quant import load_quantized
        return load_quantized(spec, quantize, dtype=dtype, **overrides)
    return load_pretrained(spec, dtype=dtype, **overrides)


def save_merged(model, out_dir, x, autocast, tokenizer=None, gguf_type=""):
    """Fold the adapter into the weights of `model` (a plain, unsharded model), dequantize them, and write the Hugging
    Face folder out_dir/merged; with gguf_type also out_dir/merged.gguf for llama.cpp (formats/gguf_export.py). Says,
    and returns, the largest |logit difference| merged vs unmerged on the batch x, which shows the fold is right (fp32
    rounding) and what a quantized base's dequantization costs."""
    from lora import merge_and_unload
    from quant import dequantize
    model.eval()
    with torch.no_grad(), autocast:
        unmerged = model(x)[0].float()
    merged = dequantize(merge_and_unload(model))  # full precision; a quantized W is dequantized first
    with torch.no_grad(), autocast:
        error = (merged(x)[0].float() - unmerged).abs().max().item()
    folder = Path(out_dir) / "merged"
    merged.save_pretrained(folder)
    print(f"merged model saved to {folder} (Hugging Face format, full precision); largest |logit difference| merged "
          f"vs unmerged on a val batch: {error:.2e}")
    if gguf_type:  # the same weights as one file for llama.cpp / ollama
        from formats.gguf_export import write_gguf
        write_gguf(merged, tokenizer, folder.with_suffix(".gguf"), gguf_type, overwrite=True, name=Path(out_dir).name)
        print(f"merged model saved to {folder.with_suffix('.gguf')} (GGUF, {gguf_type}; docs/gguf_export.md)")
    return error
