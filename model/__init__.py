"""Models written out by hand, with Hugging Face's module names: GPT-2, LLaMA and Gemma 3 (text).

MODELS is the one place that knows the model families: config.json's `model_type` -> class. Loading a Hugging Face
folder, rebuilding a checkpoint, train.py's `model_type` and adapter saving all go through it. A new family is a
new file with a CausalLM subclass (model/lm.py says what it provides) and one entry here, as Gemma 3 was.
"""
from .gemma import Gemma, GemmaConfig
from .gpt import GPT, GPTConfig
from .hf import load_hf_config, resolve_model_dir
from .llama import LLaMA, LLaMAConfig
from tools.errors import UserError

MODELS = {cls.model_type: cls for cls in (GPT, LLaMA, Gemma)}


def model_class(model_type):
    """The class for a model_type ('gpt2', 'llama')."""
    if model_type not in MODELS:
        raise UserError(f"model_type {model_type!r} is not supported: use one of {', '.join(map(repr, MODELS))}")
    return MODELS[model_type]


def build_model(model_type, model_args):
    """A freshly initialised model from its model_type and config dict (config_dict() gives it back)."""
    cls = model_class(model_type)
    return cls(cls.config_class(**model_args))


def load_pretrained(name_or_path, dtype=None, **overrides):
    """A Hugging Face folder (or cached hub name) as our model of its config.json's model_type.
    `overrides` may set dropout."""
    model_dir = resolve_model_dir(name_or_path)
    try:
        cls = model_class(load_hf_config(model_dir).get("model_type"))
    except ValueError as e:
        raise UserError(f"{model_dir}: {e}") from None
    return cls.from_pretrained(model_dir, dtype=dtype, **overrides)
