"""AdaLoRA (lora/adalora.py): P diag(lambda) Q on the target Linears, its ranks pruned while training.

Two things happen around the step: P and Q are kept near orthonormal by a term added to the loss, and after each
optimizer step the importance of every triplet is updated and the least important are masked to the schedule's
budget. training_hooks() hands both to train.py, with the allocator's state for the checkpoint.
"""
from adapters.method import Method


class Hooks:
    def __init__(self, model, checkpoint=None):
        from lora.adalora import RankAllocator
        self.allocator = RankAllocator(model, model.adalora_config)
        if checkpoint is not None and "allocator" in checkpoint:
            self.allocator.load_state_dict(checkpoint["allocator"])

    def loss(self, model):
        from lora.adalora import orth_regularization  # PEFT adds this to its loss too
        return model.adalora_config.orth_reg_weight * orth_regularization(model)

    def after_step(self, model, step):
        self.allocator.update_and_allocate(model, step)  # importance from this step's gradients, then mask

    def state_dict(self):
        return {"allocator": self.allocator.state_dict()}


class AdaLoRA(Method):
    name = "adalora"
    summary = "P diag(lambda) Q, ranks pruned while training"
    attribute = "adalora_config"
    peft_type = "ADALORA"
    settings = {"adalora_init_r": "init_r", "adalora_target_r": "target_r", "lora_alpha": "alpha",
                "lora_dropout": "dropout", "lora_targets": "targets", "adalora_tinit": "tinit",
                "adalora_tfinal": "tfinal", "adalora_deltaT": "deltaT",
                "adalora_orth_reg_weight": "orth_reg_weight"}
    can = ("adapter_off", "packing", "merge")

    def config_class(self):
        from lora.adalora import AdaLoRAConfig
        return AdaLoRAConfig

    def config(self, settings):
        from adapters.lora import targets_from_setting
        fields = {f: settings[k] for k, f in self.settings.items() if k in settings}
        if "targets" in fields:
            fields["targets"] = targets_from_setting(fields["targets"])
        return self.config_class()(**fields, total_step=settings["max_steps"])  # the pruning schedule ends with the run

    def apply(self, model, config, encode=None, **kwargs):
        from lora.adalora import apply_adalora
        return apply_adalora(model, config)

    def disabled(self, model):
        from lora import lora_disabled  # SVDLinear is a LoRALinear: switched off alike
        return lora_disabled(model)

    def training_hooks(self, model, checkpoint=None):
        return Hooks(model, checkpoint)

    def save(self, model, path, base_model_name_or_path=None, state=None):
        from lora.adalora import save_adalora_adapter
        return save_adalora_adapter(model, path, base_model_name_or_path)

    def load(self, model, path):
        from lora.adalora import load_adalora_adapter
        return load_adalora_adapter(model, path)


ADALORA = AdaLoRA()
