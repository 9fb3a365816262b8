"""LoRA adapters on disk, in Hugging Face PEFT's format (so PEFT and the Hub can use ours, and we theirs).

A PEFT LoRA adapter is a folder with two files:

    adapter_config.json        {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors  base_model.model.<module>.lora_A.weight   (r, in)
                               base_model.model.<module>.lora_B.weight   (out, r)
                               base_model.model.<module>.lora_magnitude_vector  (out,) DoRA only
                               base_model.model.<module>.<tensor>        for each module in modules_to_save

"base_model.model." is PEFT's wrapper path (PeftModel.base_model is a LoraModel whose .model is the network).
Our module names are Hugging Face's, so <module> needs no translation. Two GPT-2 details:
  - Hugging Face GPT-2's c_attn/c_proj/c_fc are Conv1D layers with weight (in, out); PEFT marks that with
    "fan_in_fan_out": true, but still stores lora_A as (r, in) and lora_B as (out, r), exactly our shapes. Only a
    full Conv1D weight saved through modules_to_save is transposed (ours is nn.Linear, (out, in)).
  - PEFT saves a module_to_save under its plain name (no ".modules_to_save.default."), and so do we.

DoRA ("use_dora": true) and PiSSA load both ways. A PiSSA adapter is saved as the plain rank-2r LoRA it amounts
to on the original base (lora/pissa.py); a PEFT adapter saved unconverted ("init_lora_weights": "pissa") is
loaded as PEFT loads it: the SVD is redone on the given base, then the trained A and B are copied in.
Loading refuses what it does not implement instead of loading it wrongly: LoRA biases, per-layer ranks, layer
subsets, inits that rewrite the base we do not have (OLoRA, CorDA, LoftQ, LoRA-GA), non-LoRA PEFT types, and any
unknown option that is set. Weights are read from safetensors, or
from an old-style adapter_model.bin with torch.load(weights_only=True), which cannot run code.
"""
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from tools.atomic import atomic_path
from model.hf import read_json, read_safetensors, read_torch_weights
from lora.inject import (LORA_KEYS, LoRAConfig, _modules_to_save, apply_lora, collapse_names, lora_layers,
                         lora_state_dict, remove_lora)
from lora import named
from lora.pissa import as_plain_lora, is_pissa, plain_lora_alpha
from tools.errors import UserError

CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."

# adapter_config.json keys we read, or may ignore because they do not change what loading means
USED = {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out",
        "use_rslora", "bias", "modules_to_save", "use_dora", "init_lora_weights"}
IGNORED = {"base_model_name_or_path", "revision", "inference_mode", "peft_version", "auto_mapping",
           "loftq_config", "eva_config", "corda_config", "lora_ga_config",  # init-time only
           "megatron_core", "qalora_group_size", "ensure_weight_tying",  # only matter with options we refuse
           "layers_pattern"}  # only used together with layers_to_transform
# every other key must be unset (None, False, {}, [], ""); these are the ones we know and name in errors
UNSUPPORTED = {"lora_bias": "trainable LoRA biases", "layers_to_transform": "adapting a "
               "subset of layers", "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
               "exclude_modules": "excluded modules", "target_parameters": "LoRA on nn.Parameters",
               "trainable_token_indices": "trainable tokens", "layer_replication": "layer replication",
               "use_qalora": "QALoRA", "alora_invocation_tokens": "aLoRA", "megatron_config": "Megatron layers"}


def conv1d_names(model) -> tuple:
    """The weights the model's Hugging Face twin stores transposed as Conv1D (GPT-2's projections, model/gpt.py):
    PEFT then says fan_in_fan_out=True and stores modules_to_save in that layout. () for other models."""
    return getattr(model, "CONV1D_NAMES", ())


def save_adapter(model, path, base_model_name_or_path=None, state=None):
    """Write adapter_config.json + adapter_model.safetensors (PEFT format) into folder `path`, atomically each.

    state: the adapter's tensors as lora_state_dict(model) gives them (default); an FSDP run passes them gathered
    to rank 0, its model holding only shards."""
    config = getattr(model, "lora_config", None)
    if config is None or not lora_layers(model):
        raise UserError(f"save_adapter: {type(model).__name__} has no LoRA layers; apply_lora(model, config) first")
    conv1d = conv1d_names(model)
    pissa = is_pissa(config.init)  # saved as the plain LoRA it amounts to on the original base (lora/pissa.py)
    tensors = {}
    if state is None:
        for name, layer in lora_layers(model):
            A, B = as_plain_lora(layer) if pissa else (layer.lora_A.detach(), layer.lora_B.detach())
            tensors[f"{PREFIX}{name}.lora_A.weight"] = A  # (r, in)
            tensors[f"{PREFIX}{name}.lora_B.weight"] = B  # (out, r)
            if layer.lora_magnitude_vector is not None:
                tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach()  # (out,)
        state = {k: v for k, v in lora_state_dict(model).items() if not k.endswith(LORA_KEYS)}  # modules_to_save
    elif pissa:
        raise UserError("save_adapter(state=...): a PiSSA adapter is converted to plain LoRA from its layers, "
                         "not from gathered tensors; train PiSSA with parallel='ddp'")
    for key, t in state.items():
        if key.endswith((".lora_A", ".lora_B")):  # (r, in), (out, r): PEFT's names end in .weight
            tensors[f"{PREFIX}{key}.weight"] = t.detach()
        elif key.endswith(".lora_magnitude_vector"):  # DoRA's m (out,)
            tensors[PREFIX + key] = t.detach()
        elif not key.endswith(LORA_KEYS):  # a modules_to_save tensor, stored in PEFT's (Hugging Face's) layout
            tensors[PREFIX + key] = t.detach().t() if conv1d and key.endswith(conv1d) else t.detach()
    targets = config.targets if isinstance(config.targets, str) else list(config.targets)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2 * config.r if pissa else config.r,
        "lora_alpha": plain_lora_alpha(config.alpha, config.rslora) if pissa else config.alpha,
        "lora_dropout": config.dropout, "target_modules": targets, "fan_in_fan_out": bool(conv1d),
        "use_rslora": config.rslora, "bias": "none", "modules_to_save": _modules_to_save(model, config.modules_to_save) or None,
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True, "use_dora": config.use_dora,
        "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    return write_adapter_files(path, peft_config, tensors)


def write_adapter_files(path, peft_config, tensors):
    """The two files of any PEFT adapter into folder `path`, atomically each; returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path / WEIGHTS_NAME) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with atomic_path(path / CONFIG_NAME) as tmp, open(tmp, "w") as f:
        json.dump(peft_config, f, indent=2)
    return path


def read_adapter(path):
    """(config dict, {key: tensor}) from a PEFT adapter folder, after checking the config is one we implement."""
    config, tensors = read_adapter_files(path)
    check_peft_config(config, Path(path) / CONFIG_NAME)
    return config, tensors


def read_adapter_files(path):
    """(adapter_config.json as a dict, {key: tensor}) from any PEFT adapter folder, unchecked."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; expected a PEFT adapter folder "
                                f"({CONFIG_NAME} + {WEIGHTS_NAME})")
    config = read_json(path / CONFIG_NAME)
    if (path / WEIGHTS_NAME).is_file():
        tensors = read_safetensors(path / WEIGHTS_NAME)
    elif (path / LEGACY_WEIGHTS_NAME).is_file():  # restricted unpickler: tensors and plain containers only
        tensors = read_torch_weights(path / LEGACY_WEIGHTS_NAME)
    else:
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}) next to {CONFIG_NAME}")
    return config, tensors


def check_peft_config(config: dict, path="adapter"):
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type={config.get('peft_type')!r}; only LoRA adapters (peft_type 'LORA') "
                         f"are supported")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise UserError(f"{path}: task_type={config['task_type']!r}; only CAUSAL_LM adapters fit our models")
    if config.get("bias", "none") != "none":
        raise UserError(f"{path}: bias={config['bias']!r} (trained base biases) is not supported; only 'none'")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise UserError(f"{path}: \"r\" must be a positive int (the LoRA rank), got {r!r}"
                         f"{' (missing)' if 'r' not in config else ''}; save the adapter again")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise UserError(f"{path}: \"lora_alpha\" must be a positive number, got {alpha!r}"
                         f"{' (missing)' if 'lora_alpha' not in config else ''}; save the adapter again")
    if config.get("target_modules") in (None, "all-linear") or isinstance(config.get("target_modules"), dict):
        raise UserError(f"{path}: target_modules={config.get('target_modules')!r} is not supported; "
                         f"it must be a list of module names or a regex")
    init = config.get("init_lora_weights", True)
    if not (init in (True, False, None, "gaussian", "eva", "orthogonal") or is_pissa(init)):
        raise UserError(f"{path}: init_lora_weights={init!r} rewrites the base model's weights in a way nanoLoRA "
                         f"does not implement; save the adapter converted to plain LoRA (PEFT's "
                         f"path_initial_model_for_weight_conversion) and load that")
    for key, value in config.items():
        if key in USED or key in IGNORED or value in (None, False, {}, [], ""):
            continue
        what = UNSUPPORTED.get(key, "an option nanoLoRA does not know")
        raise UserError(f"{path}: unsupported PEFT option {key}={value!r} ({what}); refusing to load it wrongly")


def load_adapter(model, path, mode="split", adapter_name=None):
    """Load a PEFT-format LoRA adapter (ours or PEFT's) into `model`, in place; returns the model.

    If the model has no LoRA yet, the adapter's config is applied first (with `mode`); otherwise its LoRA layers
    must be exactly the adapter's, with the same r and scaling. With `adapter_name` (lora/named.py), a model that
    has adapters but none of that name gets this one added beside them, parked: set_adapter(model, name) runs it.
    """
    config, tensors = read_adapter(path)
    lora, other = {}, {}  # module name -> {"A": t, "B": t, "m": t};  our state-dict key -> t
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise UserError(f"{path}: tensor {key!r} does not start with {PREFIX!r}; not a PEFT LoRA adapter")
        key = key[len(PREFIX):]
        for part, suffix in PARTS.items():
            if key.endswith(suffix):
                lora.setdefault(key[: -len(suffix)], {})[part.split(".")[0]] = t
                break
        else:
            other[key] = t
    targets = config["target_modules"]
    want = LoRAConfig(r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
                      targets=targets if isinstance(targets, str) else tuple(targets), mode=mode,
                      rslora=bool(config.get("use_rslora", False)),
                      modules_to_save=tuple(config.get("modules_to_save") or ()),
                      use_dora=bool(config.get("use_dora", False)),
                      init=config["init_lora_weights"] if is_pissa(config.get("init_lora_weights")) else "kaiming")
    if want.init.startswith("pissa_niter_"):
        warnings.warn(f"{path}: an unconverted PiSSA adapter (init_lora_weights={want.init!r}): its residual base "
                      f"is rebuilt with a new randomized SVD, as PEFT does, so it differs from the one it was trained "
                      f"on; save PiSSA adapters converted to plain LoRA instead")
    applied_here = not lora_layers(model)
    added_here = not applied_here and adapter_name is not None and adapter_name not in named.adapter_names(model)
    if applied_here:
        requires_grad = {p: p.requires_grad for p in model.parameters()}
        apply_lora(model, want)
    try:
        if applied_here and adapter_name is not None:
            named.name_adapter(model, adapter_name)
        if added_here:
            layers = named.add_adapter(model, adapter_name, want)
        elif adapter_name is not None and adapter_name != named.active_adapter(model):
            raise UserError(f"{path}: adapter {adapter_name!r} already exists; load into it after "
                             f"set_adapter(model, {adapter_name!r}), or pick a new name")
        else:
            layers = dict(lora_layers(model))
        _check_same_layers(layers, lora, want, path)
        conv1d = conv1d_names(model) if config.get("fan_in_fan_out") else ()
        to_copy = _match_modules_to_save(model, other, want, conv1d, path)
    except Exception:
        if applied_here:  # leave the model as we found it
            remove_lora(model)
            for p, flag in requires_grad.items():
                p.requires_grad_(flag)
        if added_here and adapter_name in named.adapter_names(model):
            named.delete_adapter(model, adapter_name)
        raise
    with torch.no_grad():
        for target, t in to_copy:
            target.copy_(t)
        for name, layer in layers.items():
            for part, param in lora_params(layer).items():
                param.copy_(lora[name][part])
    return model


PARTS = {"A": ".lora_A.weight", "B": ".lora_B.weight", "m": ".lora_magnitude_vector",
         "m.weight": ".lora_magnitude_vector.weight"}  # PEFT writes the magnitude without ".weight"; read both
PARAM_NAMES = {"A": "lora_A", "B": "lora_B", "m": "lora_magnitude_vector"}


def lora_params(layer):
    """{"A": lora_A, "B": lora_B (, "m": lora_magnitude_vector)} of one layer: what an adapter file holds."""
    params = {"A": layer.lora_A, "B": layer.lora_B}
    if layer.lora_magnitude_vector is not None:
        params["m"] = layer.lora_magnitude_vector
    return params


def _check_same_layers(layers, lora, want, path):
    unknown = sorted(set(lora) - set(layers))
    if unknown:
        raise UserError(f"{path}: the adapter has LoRA weights for {', '.join(collapse_names(unknown))}, which "
                         f"are not LoRA layers of this model (target module missing: a different architecture, "
                         f"or the model's LoRA was applied with other targets)")
    missing = sorted(set(layers) - set(lora))
    if missing:
        raise UserError(f"{path}: the model's LoRA layers {', '.join(collapse_names(missing))} have no weights "
                         f"in the adapter")
    for name, layer in layers.items():
        want_parts = set(lora_params(layer))
        if set(lora[name]) != want_parts:
            missing, extra = want_parts - set(lora[name]), set(lora[name]) - want_parts
            raise UserError(f"{path}: {name} has {', '.join(PARAM_NAMES[p] for p in sorted(missing | extra))} "
                             f"{'missing' if missing else 'unexpected'} (the adapter config says use_dora="
                             f"{want.use_dora}; the model's layer is{'' if 'm' in want_parts else ' not'} DoRA)")
        if layer.merged:
            raise RuntimeError(f"{name} is merged; unmerge_lora(model) before loading an adapter into it")
        scaling = want.alpha / want.r ** 0.5 if want.rslora else want.alpha / want.r
        if layer.r != want.r or abs(layer.scaling - scaling) > 1e-12 * abs(scaling):
            raise UserError(f"{path}: adapter has r={want.r}, lora_alpha={want.alpha}, use_rslora={want.rslora} "
                             f"(scaling {scaling:g}) but the model's {name} has r={layer.r}, lora_alpha="
                             f"{layer.lora_alpha}, rslora={layer.rslora} (scaling {layer.scaling:g})")
        for part, param in lora_params(layer).items():
            found, expected = tuple(lora[name][part].shape), tuple(param.shape)
            if found != expected:
                raise UserError(f"{path}: {name}.{PARAM_NAMES[part]} has shape {found}, the model expects "
                                 f"{expected} (layer {layer.out_features}x{layer.in_features}, r={layer.r}): the "
                                 f"adapter was made for a different base model")


def _match_modules_to_save(model, other, want, conv1d, path):
    expected = {}
    for module_name in _modules_to_save(model, want.modules_to_save):
        for key, t in model.get_submodule(module_name).state_dict().items():
            expected[f"{module_name}.{key}"] = t
    unknown = sorted(set(other) - set(expected))
    if unknown:
        raise UserError(f"{path}: unexpected tensors {', '.join(collapse_names(unknown))} (neither lora_A/lora_B "
                         f"nor in modules_to_save {list(want.modules_to_save)})")
    missing = sorted(set(expected) - set(other))
    if missing:
        raise UserError(f"{path}: modules_to_save tensors {', '.join(collapse_names(missing))} missing")
    to_copy = []  # checked before anything is written, so a bad adapter leaves the model untouched
    for key, target in expected.items():
        t = other[key].t() if conv1d and key.endswith(conv1d) else other[key]
        if t.shape != target.shape:
            raise UserError(f"{path}: {key} has shape {tuple(t.shape)}, the model expects "
                             f"{tuple(target.shape)}: the adapter was made for a different base model")
        to_copy.append((target, t))
    return to_copy

