"""Prompt tuning, P-tuning and prefix tuning (prompts/): n learned positions in front of every sequence.

One row class, three rows. Switching them off means taking the prompt encoder away for a moment: the model then
runs as the frozen base. They need their positions before each sequence, so packed SFT rows (several examples
per row, each starting mid-row) cannot carry them; and there is nothing to fold into the weights.
"""
from contextlib import contextmanager

from adapters.method import Method


@contextmanager
def prompt_disabled(model):
    """with prompt_disabled(model): the base model, without its learned positions."""
    encoder = model._modules.pop("prompt_encoder")
    try:
        yield model
    finally:
        model._modules["prompt_encoder"] = encoder


class Prompt(Method):
    attribute = "prompt_config"
    settings = {"num_virtual_tokens": "num_virtual_tokens", "prompt_init": "init", "prompt_init_text": "init_text",
                "encoder_type": "encoder_type", "encoder_hidden_size": "encoder_hidden_size",
                "prefix_projection": "prefix_projection"}
    can = ("adapter_off",)

    def __init__(self, name, peft_type, summary):
        self.name, self.peft_type, self.summary = name, peft_type, summary

    def config_class(self):
        from prompts import PromptConfig
        return PromptConfig

    def config(self, settings):
        from prompts import PromptConfig
        return PromptConfig(method=self.name, **{f: settings[k] for k, f in self.settings.items() if k in settings})

    def config_from_dict(self, values):
        config = super().config_from_dict(values)
        from dataclasses import replace
        return replace(config, init="random") if config.init == "text" else config  # only a fresh start reads text

    def apply(self, model, config, encode=None, **kwargs):
        from prompts import apply_prompt
        return apply_prompt(model, config, encode)

    def attached(self, model):
        return hasattr(model, "prompt_config") and model.prompt_config.method == self.name

    def disabled(self, model):
        return prompt_disabled(model)

    def save(self, model, path, base_model_name_or_path=None, state=None):
        from prompts import save_prompt_adapter
        return save_prompt_adapter(model, path, base_model_name_or_path)

    def load(self, model, path):
        from prompts import load_prompt_adapter
        return load_prompt_adapter(model, path)


PROMPT = Prompt("prompt", "PROMPT_TUNING", "n input embeddings")
PTUNING = Prompt("ptuning", "P_TUNING", "n input embeddings from an MLP or LSTM")
PREFIX = Prompt("prefix", "PREFIX_TUNING", "n keys/values per layer")
