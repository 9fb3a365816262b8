"""Full fine-tuning: every weight trains. The row with nothing to attach, switch off or save apart.

It has no adapter to switch off, so DPO's reference is precomputed or a frozen copy; its checkpoint holds every
weight, and parallel='fsdp' shards them. A quantized weight cannot train, so it needs a full-precision base.
"""
from adapters.method import Method


class Full(Method):
    name = "full"
    summary = "every weight"
    can = ("packing", "fsdp")

    def lacks(self, capability, settings):
        if capability == "quantized_base":
            return "peft_method='full' (every weight trains, and a quantized weight cannot)"
        return super().lacks(capability, settings)


FULL = Full()
