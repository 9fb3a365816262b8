"""nanoLoRA's LoRA: a hand-written LoRALinear (layer.py), putting it into any model (inject.py), looking at the
result (summary.py), and adapters on disk in Hugging Face PEFT's format (adapter.py). Read them in that order.
The variants, one small file each: dora.py (DoRA), pissa.py (PiSSA init), loraplus.py (LoRA+ learning rates),
named.py (several named adapters on one model, weighted combinations). grouped.py computes the LoRA layers that
read the same input (q/k/v) with one down-projection GEMM.

    from lora import LoRAConfig, apply_lora, print_trainable_parameters, save_adapter
    apply_lora(model, LoRAConfig(r=8, alpha=16, targets=("c_attn",)))
    print_trainable_parameters(model)  # trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364
    ... train the parameters with requires_grad ...
    save_adapter(model, "out/adapter")  # loads with peft.PeftModel.from_pretrained(hf_gpt2, "out/adapter")
"""
from lora.adapter import load_adapter, read_adapter, save_adapter
from lora.grouped import set_lora_grouping
from lora.inject import (LoRAConfig, apply_lora, disable_lora, enable_lora, lora_disabled,
                         lora_layers, lora_state_dict, mark_only_lora_trainable, merge_and_unload,
                         merge_lora, remove_lora, set_lora_mode, unmerge_lora)
from lora.layer import FusedLoRALinear, LoRALinear
from lora.named import (active_adapter, add_adapter, add_weighted_adapter, adapter_layers, adapter_names,
                        delete_adapter, set_adapter)
from lora.summary import count_parameters, print_trainable_parameters, summary

__all__ = ["LoRALinear", "FusedLoRALinear", "LoRAConfig", "apply_lora", "mark_only_lora_trainable", "lora_layers",
           "lora_state_dict", "set_lora_mode", "merge_lora", "unmerge_lora", "merge_and_unload", "remove_lora",
           "disable_lora", "enable_lora", "lora_disabled", "count_parameters", "print_trainable_parameters",
           "summary", "save_adapter", "load_adapter", "read_adapter",
           "add_adapter", "set_adapter", "delete_adapter", "adapter_names", "adapter_layers", "active_adapter",
           "add_weighted_adapter", "set_lora_grouping"]
