"""LoRA (lora/): B A trained beside the frozen target Linears; every LoRAConfig field is a setting lora_<field>.

Switching it off (lora_disabled) computes W x: the starting model, except with PiSSA, whose base holds the
residual W - s B0 A0 (switched off, it is not the starting model), and with modules_to_save, whose trained copies
are no adapter to switch off. Those two are the settings that take DPO's free reference away. PiSSA also needs the
full-precision W for its SVD, so it cannot start on a quantized base.
"""
from dataclasses import fields

from adapters.method import Method


def targets_from_setting(value):
    """train.py's lora_targets as LoRAConfig takes it. The setting reads the same in a config file and a flag:
        ('q_proj', 'v_proj') or 'q_proj,v_proj'   module names or .-suffixes
        'all-linear'                              every Linear but lm_head (PEFT's name)
        're:<regex>'                              a regex over whole module names (LoRAConfig's str)"""
    if not isinstance(value, str):
        return tuple(value)
    if value == "all-linear":
        return value
    if value.startswith("re:"):
        return value[3:]
    return tuple(name.strip() for name in value.split(",") if name.strip())


def lora_setting_names():
    """{'lora_r': 'r', 'lora_alpha': 'alpha', ...}: one train.py setting per LoRAConfig field."""
    from lora import LoRAConfig
    return {"lora_" + f.name: f.name for f in fields(LoRAConfig)}


class LoRA(Method):
    name = "lora"
    summary = "B A on the target Linears"
    attribute = "lora_config"
    peft_type = "LORA"
    can = ("adapter_off", "quantized_base", "packing", "fsdp", "merge")

    @property
    def settings(self):
        return lora_setting_names()

    def config_class(self):
        from lora import LoRAConfig
        return LoRAConfig

    def config(self, settings):
        if "lora_targets" in settings:
            settings = {**settings, "lora_targets": targets_from_setting(settings["lora_targets"])}
        return super().config(settings)

    def apply(self, model, config, encode=None, **kwargs):
        from lora import apply_lora
        return apply_lora(model, config, **kwargs)  # kwargs: pissa_factors, a resumed PiSSA run's A0, B0

    def restore(self, model, config, state):
        from lora.pissa import saved_factors  # PiSSA: the very same residual base as in training
        return self.apply(model, config, pissa_factors=saved_factors(state))

    def attached(self, model):  # AdaLoRA's layers are LoRA layers too, with their own config attribute
        return hasattr(model, "lora_config") and not hasattr(model, "adalora_config")

    def disabled(self, model):
        from lora import lora_disabled
        return lora_disabled(model)

    def state_dict(self, model, state):
        from lora import lora_state_dict
        return lora_state_dict(model, state)  # lora_A, lora_B (DoRA, PiSSA tensors) and modules_to_save

    def save(self, model, path, base_model_name_or_path=None, state=None):
        from lora import save_adapter
        return save_adapter(model, path, base_model_name_or_path, state=state)

    def load(self, model, path):
        from lora import load_adapter
        return load_adapter(model, path)

    def lacks(self, capability, settings):
        init, saved = settings.get("lora_init", "kaiming"), settings.get("lora_modules_to_save", ())
        if init.startswith("pissa"):  # its base is the residual W - s B0 A0, computed from full-precision weights
            reasons = {"adapter_off": f"lora_init={init!r} (switched off, the residual base is not the starting model)",
                       "quantized_base": f"lora_init={init!r} (its SVD needs the full-precision weights)",
                       "fsdp": f"lora_init={init!r}"}
            if capability in reasons:
                return reasons[capability]
        if capability == "adapter_off" and saved:
            return f"lora_modules_to_save={tuple(saved)!r} (trained copies, which switching LoRA off keeps)"
        return super().lacks(capability, settings)


LORA = LoRA()
