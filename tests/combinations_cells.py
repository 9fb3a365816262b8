"""The matrix of train.py's settings that tests/test_combinations.py walks: its axes, one cell's settings as train.py
reads them, and the settings of a tiny run of a cell. Which cells are refused is the test's own table (REFUSALS).

    objective      lm, sft, dpo, grpo                             (objectives.OBJECTIVES)
    peft_method    full, lora, adalora, prompt, ptuning, prefix    (adapters.METHODS)
    variant        none, dora, pissa, rslora, modules_to_save, fused: LoRA settings, another method's by ownership
    quantize       '', 'nf4'
    packing        True, False                                    sft only (another objective's setting elsewhere)
    dpo_reference  auto, adapter_off, precompute, copy             dpo only
    merge_on_save  False, True
    loss path      loss_chunk_size default (1024), 0 (full logits)
    parallel       one process (not given), ddp, fsdp
"""
import functools
import itertools
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OBJECTIVES = ("lm", "sft", "dpo", "grpo")
METHODS = ("full", "lora", "adalora", "prompt", "ptuning", "prefix")
PROMPT_METHODS = ("prompt", "ptuning", "prefix")
FINAL_NORM = {"gpt2": ("ln_f",), "llama": ("norm",)}  # the final norm, the module trained whole by modules_to_save
VARIANTS = {  # the LoRA variant -> its settings (a family's final norm for modules_to_save)
    "none": lambda family: {},
    "dora": lambda family: {"lora_use_dora": True},
    "pissa": lambda family: {"lora_init": "pissa"},
    "rslora": lambda family: {"lora_rslora": True},
    "modules_to_save": lambda family: {"lora_modules_to_save": FINAL_NORM[family]},
    "fused": lambda family: {"lora_mode": "fused"},
}
QUANTIZE = ("", "nf4")
PACKING = {"sft": (True, False)}  # other objectives: not given
REFERENCES = {"dpo": ("auto", "adapter_off", "precompute", "copy")}  # other objectives: not given
MERGE = (False, True)
LOSS_CHUNK = (None, 0)  # None: train.py's default loss_chunk_size (the chunked loss); 0: the plain loss
PARALLEL = (None, "ddp", "fsdp")  # None: one process, parallel not given


@functools.lru_cache(maxsize=1)
def train_defaults():
    """train.py's settings section, read without running the training (as tests/test_configurator.py does); callers
    merge it into dicts of their own, never change it."""
    source = (ROOT / "train.py").read_text()
    section = source[source.index("# settings:"):source.index("from configurator import")]
    namespace = {}
    exec(section, namespace)
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))}


@dataclass(frozen=True)
class Cell:
    objective: str
    method: str
    variant: str = "none"
    quantize: str = ""
    packing: bool | None = None
    reference: str | None = None
    merge: bool = False
    chunk: int | None = None
    parallel: str | None = None

    @property
    def id(self):
        parts = [self.objective, self.method]
        if self.variant != "none":
            parts.append(self.variant)
        if self.quantize:
            parts.append(self.quantize)
        if self.packing is not None:
            parts.append("packed" if self.packing else "padded")
        if self.reference is not None:
            parts.append(f"ref={self.reference}")
        if self.merge:
            parts.append("merge")
        if self.chunk is not None:
            parts.append(f"chunk={self.chunk}")
        if self.parallel is not None:
            parts.append(self.parallel)
        return "-".join(parts)

    def given(self, family="gpt2"):
        """The settings this cell sets (config files and flags): train.py's `given`."""
        given = {"objective": self.objective, "peft_method": self.method, "init_from": "base",
                 **VARIANTS[self.variant](family)}
        for key, value in (("quantize", self.quantize or None), ("packing", self.packing),
                           ("dpo_reference", self.reference), ("merge_on_save", self.merge or None),
                           ("loss_chunk_size", self.chunk), ("parallel", self.parallel)):
            if value is not None:
                given[key] = value
        return given

    @property
    def pissa(self):
        return self.method == "lora" and self.variant == "pissa"


def every_cell():
    """The whole product, each objective with its own axes."""
    for objective, method, variant, quantize in itertools.product(OBJECTIVES, METHODS, VARIANTS, QUANTIZE):
        for packing, reference, merge, chunk, parallel in itertools.product(
                PACKING.get(objective, (None,)), REFERENCES.get(objective, (None,)), MERGE, LOSS_CHUNK, PARALLEL):
            yield Cell(objective, method, variant, quantize, packing, reference, merge, chunk, parallel)


# ---- tiny runs ---------------------------------------------------------------------------------------------------
VOCAB = 128
BLOCK = 16  # tokens per row; the base holds 32 positions, so prompt methods' 4 virtual tokens fit
TARGETS = {"gpt2": ("c_attn", "c_fc"), "llama": ("q_proj", "v_proj", "up_proj")}


def method_settings(method, family):
    """Small settings of the method (given with it only: each belongs to the method by the ownership rule)."""
    if method == "lora":
        return {"lora_r": 4, "lora_alpha": 8.0, "lora_targets": TARGETS[family]}
    if method == "adalora":
        return {"adalora_init_r": 4, "adalora_target_r": 2, "lora_alpha": 8.0, "lora_targets": TARGETS[family]}
    if method == "ptuning":
        return {"num_virtual_tokens": 4, "encoder_hidden_size": 16}
    if method in PROMPT_METHODS:
        return {"num_virtual_tokens": 4}
    return {}


def objective_settings(objective):
    """Small settings of the objective: GRPO samples 4 completions of up to 4 tokens (prompts of up to 12)."""
    if objective == "grpo":
        return {"grpo_num_generations": 4, "grpo_max_new_tokens": 4, "grpo_reward": "exact"}
    return {}


def base_settings(family):
    """The tiny base of a family: 2 layers of width 32 over 32 positions."""
    shape = dict(model_type=family, n_layer=2, n_head=4, n_embd=32, block_size=2 * BLOCK, vocab_size=VOCAB)
    return {**shape, **({"n_kv_head": 2, "intermediate_size": 64} if family == "llama" else {})}


def run_settings(cell, family, base, data_dir, **overrides):
    """(config, given) of a tiny one-process run of `cell` on the base folder `base`, as train.py resolves them."""
    from training.validate import resolve_defaults, validate_config
    given = {**cell.given(family), "init_from": str(base), "data_dir": str(data_dir), "device": "cpu",
             "dtype": "float32", "compile": False, "block_size": BLOCK, "batch_size": 2, "vocab_size": VOCAB,
             "total_batch_size": 2 * BLOCK * 2, "max_steps": 4, "eval_iters": 2, "sample_interval": 0,
             **method_settings(cell.method, family), **objective_settings(cell.objective), **overrides}
    if family == "llama":
        given["model_type"] = "llama"
    config = resolve_defaults({**train_defaults(), **given})
    validate_config(config, given)
    return config, given
