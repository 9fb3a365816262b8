"""Models written out by hand, with Hugging Face's module names: GPT-2 and LLaMA."""
from .gpt import GPT, GPTConfig
from .hf import load_hf_config, resolve_model_dir
from .llama import LLaMA, LLaMAConfig
from .llama_tokenizer import load_llama_tokenizer


def load_pretrained(name_or_path, dtype=None):
    """A Hugging Face folder (or cached hub name) as our GPT or LLaMA, chosen by config.json's model_type."""
    model_dir = resolve_model_dir(name_or_path)
    model_type = load_hf_config(model_dir).get("model_type")
    if model_type == "gpt2":
        return GPT.from_pretrained(model_dir, dtype=dtype)
    if model_type == "llama":
        return LLaMA.from_pretrained(model_dir, dtype=dtype)
    raise ValueError(f"{model_dir}: model_type {model_type!r} is not supported (gpt2 or llama)")
