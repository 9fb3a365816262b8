"""Every fine-tuning method behind one table: how train.py builds it from its settings, what a checkpoint keeps
of it, and its adapter folder (Hugging Face PEFT's format) both ways.

    method     what trains                                    where           PEFT peft_type
    none       every weight (full fine-tuning)                -               -
    lora       B A on the target Linears                      lora/           LORA
    adalora    P diag(lambda) Q, ranks pruned while training  lora/adalora.py ADALORA
    prompt     n input embeddings                             prompts/        PROMPT_TUNING
    ptuning    n input embeddings from an MLP / LSTM          prompts/        P_TUNING
    prefix     n keys/values per layer                        prompts/        PREFIX_TUNING
"""
import dataclasses
import json
from pathlib import Path

METHODS = ("none", "lora", "adalora", "prompt", "ptuning", "prefix")
PROMPT_METHODS = ("prompt", "ptuning", "prefix")


# train.py's setting -> the config field it sets (a setting not given keeps the config's default)
ADALORA_SETTINGS = {"adalora_init_r": "init_r", "adalora_target_r": "target_r", "lora_alpha": "alpha",
                    "lora_dropout": "dropout", "lora_targets": "targets", "adalora_tinit": "tinit",
                    "adalora_tfinal": "tfinal", "adalora_deltaT": "deltaT",
                    "adalora_orth_reg_weight": "orth_reg_weight", "max_steps": "total_step"}
PROMPT_SETTINGS = {"num_virtual_tokens": "num_virtual_tokens", "prompt_init": "init", "prompt_init_text": "init_text",
                   "encoder_type": "encoder_type", "encoder_hidden_size": "encoder_hidden_size",
                   "prefix_projection": "prefix_projection"}


def config_from_settings(method, s):
    """The method's config dataclass from train.py's settings (a dict); None for 'none'."""
    if method not in METHODS:
        raise ValueError(f"peft_method={method!r}: use one of {', '.join(METHODS)}")
    if method == "lora":
        from lora import lora_config_from
        return lora_config_from(s)  # every lora_<field> setting
    if method == "adalora":
        from lora.adalora import AdaLoRAConfig
        return AdaLoRAConfig(**{field: s[key] for key, field in ADALORA_SETTINGS.items() if key in s})
    if method in PROMPT_METHODS:
        from prompts import PromptConfig
        return PromptConfig(method=method, **{field: s[key] for key, field in PROMPT_SETTINGS.items() if key in s})
    return None


def apply(model, method, config, encode=None, **lora_kwargs):
    """Put the method into `model` (in place) and freeze what it does not train; returns the model."""
    if method == "lora":
        from lora import apply_lora
        return apply_lora(model, config, **lora_kwargs)  # (pissa_factors: a resumed PiSSA run's A0, B0)
    if method == "adalora":
        from lora.adalora import apply_adalora
        return apply_adalora(model, config)
    if method in PROMPT_METHODS:
        from prompts import apply_prompt
        return apply_prompt(model, config, encode)
    return model


def method_of(model):
    """Which method `model` carries: the attribute each apply() leaves behind."""
    if hasattr(model, "adalora_config"):
        return "adalora"
    if hasattr(model, "lora_config"):
        return "lora"
    if hasattr(model, "prompt_config"):
        return model.prompt_config.method
    return "none"


def trainable_state_dict(model):
    """What a checkpoint of an adapter run keeps of the model: the trainable tensors, by state-dict name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_entry(model):
    """{'method', 'config'} for ckpt.pt (plain values only), or None for a model without an adapter."""
    method = method_of(model)
    if method == "none":
        return None
    config = getattr(model, {"lora": "lora_config", "adalora": "adalora_config"}.get(method, "prompt_config"))
    return {"method": method, "config": {k: list(v) if isinstance(v, tuple) else v
                                         for k, v in dataclasses.asdict(config).items()}}


def from_checkpoint_entry(model, entry, **lora_kwargs):
    """Re-apply a checkpoint_entry() to its rebuilt base (the trained tensors are loaded by the caller)."""
    method, values = entry["method"], dict(entry["config"])
    for key in ("targets", "modules_to_save"):
        if isinstance(values.get(key), list):
            values[key] = tuple(values[key])
    if method == "lora":
        from lora import LoRAConfig as cls
    elif method == "adalora":
        from lora.adalora import AdaLoRAConfig as cls
    else:
        from prompts import PromptConfig as cls
    config = cls(**values)
    if method in PROMPT_METHODS and config.init == "text":  # only initialisation needs the tokenizer
        config = dataclasses.replace(config, init="random")
    return apply(model, method, config, **lora_kwargs)


def save_adapter(model, path, base_model_name_or_path=None):
    """The adapter folder (PEFT format) of whatever method `model` carries."""
    method = method_of(model)
    if method == "lora":
        from lora import save_adapter as save
    elif method == "adalora":
        from lora.adalora import save_adalora_adapter as save
    elif method in PROMPT_METHODS:
        from prompts import save_prompt_adapter as save
    else:
        raise ValueError(f"{type(model).__name__} carries no adapter to save (full fine-tuning saves ckpt.pt)")
    return save(model, path, base_model_name_or_path)


def load_adapter(model, path):
    """Load any PEFT adapter folder we implement into `model` (its base), chosen by adapter_config's peft_type."""
    config_path = Path(path) / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path}: no adapter_config.json; expected a PEFT adapter folder")
    peft_type = json.loads(config_path.read_text()).get("peft_type")
    if peft_type == "LORA":
        from lora import load_adapter as load
    elif peft_type == "ADALORA":
        from lora.adalora import load_adalora_adapter as load
    elif peft_type in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        from prompts import load_prompt_adapter as load
    else:
        raise ValueError(f"{path}: peft_type={peft_type!r} is not supported (LORA, ADALORA, PROMPT_TUNING, P_TUNING, "
                         f"PREFIX_TUNING)")
    return load(model, path)
