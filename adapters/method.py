"""What one row of the METHODS table (adapters/__init__.py) is: everything train.py, checkpoints and the settings
checks need to know about a fine-tuning method, so that none of them asks which method it is.

A row names the train.py settings that configure it (setting -> field of its config dataclass), builds that config,
puts the method into a model, says whether a model carries it, switches it off for a moment (the reference of DPO),
keeps its trained tensors in a checkpoint, and reads and writes its adapter folder in PEFT's format.

Capabilities are what a combination of settings may ask of a method. `lacks(capability, settings)` answers with
None (it can) or the short reason it cannot, naming the setting responsible:
    adapter_off     switching the method off gives back the starting model (DPO's free reference)
    quantized_base  it trains on a base whose Linear weights are quantized (QLoRA)
    packing         it trains on packed SFT rows (several examples per row, block-diagonal attention)
    fsdp            parallel='fsdp' can shard it
    merge           merge_on_save can fold it into the weights
"""
from tools.errors import UserError
CAPABILITIES = ("adapter_off", "quantized_base", "packing", "fsdp", "merge")


class Method:
    """A row: a subclass sets these and overrides what differs; its one instance goes into METHODS."""
    name = ""  # train.py's peft_method
    summary = ""  # what trains
    attribute = ""  # the attribute apply() leaves on the model, holding its config ('' for full fine-tuning)
    peft_type = ""  # adapter_config.json's peft_type ('' for full fine-tuning: no adapter folder)
    settings = {}  # train.py setting -> field of the config dataclass
    can = ()  # capabilities the method has whatever its settings (see lacks)

    # ---- the config ---------------------------------------------------------------------------------------
    def config_class(self):
        return None

    def config(self, settings):
        """The method's config dataclass from train.py's settings (a dict); None for full fine-tuning."""
        cls = self.config_class()
        return None if cls is None else cls(**{f: settings[k] for k, f in self.settings.items() if k in settings})

    def config_from_dict(self, values):
        """A checkpoint's plain dict back into the config (lists back into tuples)."""
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return self.config_class()(**values)

    def config_of(self, model):
        """The config the method left on `model`."""
        return getattr(model, self.attribute)

    # ---- the model ----------------------------------------------------------------------------------------
    def apply(self, model, config, encode=None, **kwargs):
        """Put the method into `model` in place, freeze what it does not train; returns the model."""
        return model

    def restore(self, model, config, state):
        """apply() on a rebuilt base, before the checkpoint's tensors `state` are loaded into it."""
        return self.apply(model, config)

    def attached(self, model):
        return bool(self.attribute) and hasattr(model, self.attribute)

    def disabled(self, model):
        """A context in which `model` computes without the method: the starting model, for a reference."""
        raise UserError(f"peft_method={self.name!r} has nothing to switch off")

    def state_dict(self, model, state):
        """What a checkpoint keeps of `state` (the model's state dict, maybe FSDP-sharded): by default the
        tensors that train."""
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        return state if not self.attribute else {k: v for k, v in state.items() if k in trained}

    def training_hooks(self, model, checkpoint=None):
        """An object with loss(model), after_step(model, step) and state_dict(), for a method that adds to the
        loss or changes the model after each step (AdaLoRA); None for the others."""
        return None

    # ---- the adapter folder (PEFT format) ------------------------------------------------------------------
    def save(self, model, path, base_model_name_or_path=None, state=None):
        raise UserError(f"peft_method={self.name!r} has no adapter folder: out_dir/ckpt.pt holds every weight")

    def load(self, model, path):
        raise UserError(f"{path}: peft_type {self.peft_type!r} has no loader")

    # ---- what it supports ----------------------------------------------------------------------------------
    def lacks(self, capability, settings):
        """None if the method, with these settings, has `capability`; else why not, naming the setting."""
        return None if capability in self.can else f"peft_method={self.name!r}"
