"""train.py's settings, checked once where they enter: by range and meaning, not only by type.

configurator.py already refuses unknown keys and wrong types; this file knows what the values mean. CHECKS has
one line per key: what a valid value is, and what resuming may do with it:
    FIXED   shapes the model, its LoRA or the data stream: a resume must use the checkpoint's value
    FREE    may change on resume (max_steps, learning rates, intervals): a value given is applied, and said
    LAUNCH  describes this launch, not the run (out_dir, device ...): never taken from the checkpoint
A key without a line is FREE and unchecked beyond its type. A new setting adds one line; a rule that involves
two keys goes into RELATIONS. The choices are the owners' own lists (the model families, the objectives, the PEFT
methods, the DPO losses, GRPO's loss types and rewards, the SFT answer matches, the LoRA modes ...), never copied here.

Beyond single values and RELATIONS, two rules come from the tables:
- a setting that belongs to a PEFT method (adapters/) or an objective (objectives/) other than the run's is
  refused when given, naming both: `--lora_r=8` with peft_method='full' would otherwise do nothing;
- what the settings ask of the PEFT method (its capabilities: a quantized base, DPO's adapter-off reference,
  packed rows, fsdp, merging; adapters/method.py) must be what its row can do, or the two settings are named.
"""
import math
import re

from adapters import CAPABILITIES, METHODS, method
from evals.exact_match import MATCHES
from lora.layer import MODES
from lora.pissa import check_init
from model import MODELS
from objectives import OBJECTIVES
from objectives.dpo import LOSSES, REFERENCES
from objectives.grpo import LOSS_TYPES as GRPO_LOSS_TYPES
from objectives.rewards import REWARDS
from prompts import INITS as PROMPT_INITS
from prompts.p_tuning import ENCODER_TYPES
from formats.gguf_export import TYPES as GGUF_TYPES
from quant import METHODS as QUANT_METHODS
from training.memory import GLIBC_MMAP_CEILING
from training.parallel import PARALLEL
from tools.errors import UserError

FIXED, FREE, LAUNCH = "fixed", "free", "launch"


def at_least(low):
    return lambda v: v >= low and (not isinstance(v, float) or math.isfinite(v))


def in_range(low, high):  # low <= v < high
    return lambda v: low <= v < high


def one_of(*allowed):
    return lambda v: v in allowed


def nonempty(v):
    return len(v) > 0


def lora_targets(v):
    """Module names (a tuple, or one str of comma-separated names), 'all-linear', or 're:<regex>'
    (adapters/lora.py targets_from_setting)."""
    if isinstance(v, str) and v.startswith("re:"):
        try:
            re.compile(v[3:])
        except re.error:
            return False
        return len(v) > 3
    names = v.split(",") if isinstance(v, str) else v
    return len(names) > 0 and all(isinstance(t, str) and t.strip() and re.fullmatch(r"[\w.\-]+", t.strip())
                                  for t in names)


def lora_init(v):
    try:
        return check_init(v) == v
    except ValueError:
        return False


def choices(values):
    return ", ".join(map(repr, values))


def device_name(v):
    return re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None


CHECKS = {
    # key                  valid(value)                      what a valid value is                       on resume
    "out_dir":             (nonempty,                        "a folder name",                                LAUNCH),
    "init_from":           (nonempty,                        "'scratch', 'resume', a model folder or name",  LAUNCH),
    "data_dir":            (nonempty,                        "a folder of token shards",                     FREE),
    "model_type":          (one_of(*MODELS),                 f"one of {', '.join(map(repr, MODELS))}",      FIXED),
    "n_layer":             (at_least(1),                     "a positive int",                               FIXED),
    "n_head":              (at_least(1),                     "a positive int",                               FIXED),
    "n_embd":              (at_least(1),                     "a positive int",                               FIXED),
    "block_size":          (at_least(1),                     "a positive int (tokens per sequence)",         FIXED),
    "vocab_size":          (at_least(1),                     "a positive int",                               FIXED),
    "dropout":             (in_range(0.0, 1.0),              "in [0, 1)",                                    FREE),
    "bias":                (one_of(True, False),             "True or False",                                FIXED),
    "n_kv_head":           (at_least(0),                     ">= 0 (0 = n_head)",                            FIXED),
    "intermediate_size":   (at_least(0),                     ">= 0 (0 = the usual 8/3 * n_embd)",            FIXED),
    "rope_theta":          (at_least(1e-9),                  "a positive number",                            FIXED),
    "batch_size":          (at_least(1),                     "a positive int (sequences per micro-batch)",   FIXED),
    "total_batch_size":    (at_least(1),                     "a positive int (tokens per optimizer step)",   FIXED),
    "max_steps":           (at_least(1),                     "a positive int (the step to stop at)",         FREE),
    "warmup_steps":        (at_least(0),                     ">= 0",                                         FREE),
    "max_lr":              (at_least(1e-300),                "a positive finite number",                     FREE),
    "min_lr":              (at_least(0.0),                   ">= 0 and finite",                              FREE),
    "weight_decay":        (at_least(0.0),                   ">= 0 and finite",                              FREE),
    "beta1":               (in_range(0.0, 1.0),              "in [0, 1)",                                    FREE),
    "beta2":               (in_range(0.0, 1.0),              "in [0, 1)",                                    FREE),
    "grad_clip":           (at_least(0.0),                   ">= 0 (0 = off)",                               FREE),
    "eval_interval":       (at_least(0),                     ">= 0 (0 = off)",                               FREE),
    "eval_iters":          (at_least(0),                     ">= 0 (batches per evaluation; 0 = all, sft/dpo)", FREE),
    "sample_interval":     (at_least(0),                     ">= 0 (0 = off)",                               FREE),
    "sample_tokens":       (at_least(1),                     "a positive int",                               FREE),
    "num_samples":         (at_least(1),                     "a positive int",                               FREE),
    "checkpoint_interval": (at_least(0),                     ">= 0 (0 = only at the end)",                   FREE),
    "hellaswag_every":     (at_least(0),                     ">= 0 (0 = off)",                               FREE),
    "hellaswag_limit":     (at_least(0),                     ">= 0 (0 = all)",                               FREE),
    "log_interval":        (at_least(1),                     "a positive int",                               FREE),
    "compile":             (one_of("auto", True, False),     "'auto', True or False",                       LAUNCH),
    "dtype":               (one_of("auto", "float32", "bfloat16", "float16"),
                                                             "'auto', 'float32', 'bfloat16' or 'float16'",   LAUNCH),
    "device":              (device_name,                     "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'",     LAUNCH),
    "seed":                (at_least(0),                     ">= 0",                                         FIXED),
    "parallel":            (one_of(*PARALLEL),               f"one of {choices(PARALLEL)}",                  LAUNCH),
    "overwrite":           (one_of(True, False),             "True or False",                                LAUNCH),
    "objective":           (one_of(*OBJECTIVES),             f"one of {choices(OBJECTIVES)}",                FIXED),
    "dpo_beta":            (at_least(1e-300),                "a positive number",                            FIXED),
    "dpo_loss":            (one_of(*LOSSES),                 f"one of {choices(LOSSES)}",                    FIXED),
    "dpo_label_smoothing": (in_range(0.0, 0.5),              "in [0, 0.5) (the chance a label is flipped)",  FIXED),
    "dpo_reference":       (one_of("auto", *REFERENCES),     f"one of {choices(('auto', *REFERENCES))}",     FIXED),
    "grpo_num_generations": (at_least(2),                    "an int >= 2 (a group of one has no baseline)", FIXED),
    "grpo_max_new_tokens": (at_least(1),                     "a positive int",                               FIXED),
    "grpo_temperature":    (lambda v: 0 < v < math.inf,      "a positive number (greedy would sample G equal completions)", FIXED),
    "grpo_top_k":          (at_least(0),                     ">= 0 (0 = every token)",                       FIXED),
    "grpo_top_p":          (lambda v: 0 < v <= 1,            "in (0, 1] (1 = off)",                          FIXED),
    "grpo_epsilon":        (in_range(1e-300, 1.0),           "in (0, 1) (the ratio is clipped to [1 - eps, 1 + eps])", FIXED),
    "grpo_beta":           (at_least(0.0),                   ">= 0 and finite (0 = no KL, no reference)",    FIXED),
    "grpo_loss_type":      (one_of(*GRPO_LOSS_TYPES),        f"one of {choices(GRPO_LOSS_TYPES)}",           FIXED),
    "grpo_scale_rewards":  (one_of(True, False),             "True or False",                                FIXED),
    "grpo_reward":         (one_of(*REWARDS),                f"one of {choices(REWARDS)}",                   FIXED),
    "packing":             (one_of(True, False),             "True or False",                                FIXED),
    "eval_generate_every": (at_least(0),                     ">= 0 (0 = off)",                               FREE),
    "eval_generate_limit": (at_least(0),                     ">= 0 (0 = all val prompts)",                   FREE),
    "eval_generate_match": (one_of(*MATCHES),                f"one of {choices(MATCHES)}",                   FREE),
    "lora_r":              (at_least(1),                     "a positive int (full fine-tuning is peft_method='full')", FIXED),
    "lora_alpha":          (at_least(1e-300),                "a positive number",                            FIXED),
    "lora_dropout":        (in_range(0.0, 1.0),              "in [0, 1)",                                    FIXED),
    "lora_targets":        (lora_targets,                    "module names (a tuple or 'a,b'), 'all-linear' or 're:<valid regex>'",
                                                                                                             FIXED),
    "lora_mode":           (one_of(*MODES),                  f"one of {choices(MODES)}",                     FIXED),
    "lora_rslora":         (one_of(True, False),             "True or False",                                FIXED),
    "lora_modules_to_save": (lambda v: all(isinstance(m, str) and m for m in v),
                                                             "a tuple of module names",                      FIXED),
    "lora_init":           (lora_init,                       "'kaiming', 'gaussian', 'pissa' or 'pissa_niter_K'", FIXED),
    "lora_use_dora":       (one_of(True, False),             "True or False",                                FIXED),
    "lora_loraplus_lr_ratio": (at_least(1e-300),             "a positive number (lora_B's lr / lora_A's)",   FIXED),
    "peft_method":         (one_of(*METHODS),                f"one of {choices(METHODS)}",                   FIXED),
    "adalora_init_r":      (at_least(1),                     "a positive int",                               FIXED),
    "adalora_target_r":    (at_least(1),                     "a positive int",                               FIXED),
    "adalora_tinit":       (at_least(0),                     ">= 0",                                         FIXED),
    "adalora_tfinal":      (at_least(0),                     ">= 0",                                         FIXED),
    "adalora_deltaT":      (at_least(1),                     "a positive int",                               FIXED),
    "adalora_orth_reg_weight": (at_least(0.0),               ">= 0",                                         FIXED),
    "num_virtual_tokens":  (at_least(1),                     "a positive int",                               FIXED),
    "prompt_init":         (one_of(*{i for inits in PROMPT_INITS.values() for i in inits}),
                                                             "one of " + "; ".join(f"{m}: {choices(i)}" for m, i in PROMPT_INITS.items()),
                                                                                                             FIXED),
    "encoder_type":        (one_of(*ENCODER_TYPES),          f"one of {choices(ENCODER_TYPES)}",             FIXED),
    "encoder_hidden_size": (at_least(0),                     ">= 0 (0 = the model's width)",                 FIXED),
    "prefix_projection":   (one_of(True, False),             "True or False",                                FIXED),
    "quantize":            (one_of("", *QUANT_METHODS),      f"one of {choices(('', *QUANT_METHODS))}",      FIXED),
    "merge_gguf":          (one_of("", *GGUF_TYPES),         f"one of {choices(('', *GGUF_TYPES))}",         FREE),
    "loss_chunk_size":     (at_least(0),                     ">= 0 (tokens per loss chunk; 0 = full logits)", FREE),
    "activation_checkpointing": (one_of(True, False),        "True or False",                                FREE),
    "cpu_mmap_threshold":  (in_range(0, GLIBC_MMAP_CEILING + 1),        "0 to 33554432 bytes (0 = glibc's own threshold)", FREE),
}

RELATIONS = [
    # (holds(config), message(config)) for rules that involve several keys
    (lambda c: not c.get("merge_gguf") or c.get("merge_on_save"),
     lambda c: f"merge_gguf={c['merge_gguf']!r} writes out_dir/merged.gguf from the merged model, which needs "
               f"merge_on_save=True: add --merge_on_save=True, or drop --merge_gguf"),
    (lambda c: c["n_embd"] % c["n_head"] == 0,
     lambda c: f"n_embd={c['n_embd']} is not divisible by n_head={c['n_head']}: each head gets n_embd/n_head "
               f"channels; change one of them"),
    (lambda c: c["n_kv_head"] == 0 or c["n_head"] % c["n_kv_head"] == 0,
     lambda c: f"n_kv_head={c['n_kv_head']} does not divide n_head={c['n_head']}: each key/value head serves "
               f"n_head/n_kv_head query heads; change one of them"),
    (lambda c: c["min_lr"] <= c["max_lr"],
     lambda c: f"min_lr={c['min_lr']} is above max_lr={c['max_lr']}: the cosine decays from max_lr down to min_lr"),
    (lambda c: c["sample_interval"] == 0 or len(c["sample_prompt"]) > 0,
     lambda c: "sample_prompt='' is empty: samples continue a prompt; give one (e.g. --sample_prompt='\\n') or "
               "--sample_interval=0"),
    (lambda c: not c["quantize"] or c["init_from"] != "scratch",
     lambda c: f"quantize={c['quantize']!r} with init_from='scratch': quantization freezes a loaded base; set "
               f"init_from to a model"),
    (lambda c: c["adalora_target_r"] <= c["adalora_init_r"],
     lambda c: f"adalora_target_r={c['adalora_target_r']} is above adalora_init_r={c['adalora_init_r']}: AdaLoRA "
               f"prunes ranks down to the target"),
    (lambda c: not (c.get("parallel") == "fsdp" and c["dtype"] == "float16"),
     lambda c: "dtype='float16' with parallel='fsdp': float16's loss scaling would skip steps on some ranks only; "
               "use --dtype=bfloat16 (FSDP's mixed precision) or --dtype=float32"),
    (lambda c: not (c["lora_mode"] == "fused" and c["lora_dropout"] > 0),
     lambda c: f"lora_mode='fused' needs lora_dropout=0 (got {c['lora_dropout']}): use lora_mode='split'"),
]

# what the settings may ask of the PEFT method: (capability, the setting that asks for it, or None), the objectives'
# own needs (DPO's reference, SFT's packing) come from their rows
NEEDS = [
    lambda c: ("quantized_base", f"quantize={c['quantize']!r}") if c["quantize"] else None,
    lambda c: ("fsdp", "parallel='fsdp'") if c.get("parallel") == "fsdp" else None,
    lambda c: ("merge", "merge_on_save=True") if c.get("merge_on_save") else None,
]
CAPABILITY_TEXT = {  # what each capability means, for the message
    "adapter_off": "a method that, switched off, is the starting model",
    "quantized_base": "a method that trains on a quantized base",
    "packing": "a method that works on packed rows (set packing=False for prompt-based methods)",
    "fsdp": "a method that parallel='fsdp' can shard (use parallel='ddp')",
    "merge": "a method that folds into the weights",
}
assert set(CAPABILITY_TEXT) == set(CAPABILITIES)


def owner_of(key):
    """('peft_method', names) or ('objective', names) for a setting that belongs to some methods or objectives."""
    methods = [name for name, row in METHODS.items() if key in row.settings]
    if methods:
        return "peft_method", methods
    objectives = [name for name, row in OBJECTIVES.items() if key in row.settings]
    return ("objective", objectives) if objectives else (None, [])


def check_ownership(config, given, flags=None):
    """A given setting of another method or objective than the run's does nothing: refuse it, naming both. One
    exception: a config file's settings of its own method (or objective) when a flag switches the run to another
    (`config/finetune_shakespeare_lora.py --peft_method=adalora` keeps the file's lora_r unused)."""
    flags = set(given) if flags is None else set(flags)
    for key in given:
        kind, owners = owner_of(key)
        if kind is not None and key not in flags and kind in flags:
            continue
        if kind is not None and config[kind] not in owners:
            raise UserError(f"{key}={config[key]!r} is a setting of {kind}={' or '.join(map(repr, owners))}, and "
                             f"this run has {kind}={config[kind]!r}: drop --{key}, or set --{kind}={owners[0]}")


def check_capabilities(config):
    """Each thing the settings ask of the PEFT method must be something its row can do, with these settings."""
    row = method(config["peft_method"])
    for need in [f(config) for f in NEEDS] + OBJECTIVES[config["objective"]].needs(config):
        if need is None:
            continue
        capability, asker = need
        reason = row.lacks(capability, config)
        if reason is not None:
            raise UserError(f"{asker} needs {CAPABILITY_TEXT[capability]}, and {reason} is not one: change one "
                             f"of the two")


def resolve_defaults(config):
    """The values of 'auto' settings (DPO's reference), resolved once, before the settings are checked."""
    row = OBJECTIVES.get(config["objective"])
    return {**config, **row.defaults(config)} if row is not None else config


def upgrade(saved):
    """A checkpoint's settings as today's train.py names them: full fine-tuning was peft_method='lora' with
    lora_r=0 (or 'none') before it was peft_method='full'; a str lora_targets was a regex before 're:' said so."""
    if saved.get("peft_method") in ("lora", "none") and saved.get("lora_r") == 0:
        saved = {**saved, "peft_method": "full", "lora_r": 16}
    targets = saved.get("lora_targets")
    if isinstance(targets, str) and targets != "all-linear" and not targets.startswith("re:"):
        saved = {**saved, "lora_targets": "re:" + targets}
    return saved


def validate_config(config, given=(), flags=None):
    """Raise UserError naming the first bad key, its value and what it must be; or the settings that cannot go
    together. `given`: the keys the user set (config files and flags), `flags` those set by flags (default: all
    of `given`), for the ownership rule."""
    for key, (valid, must_be, _) in CHECKS.items():
        if key in config and not valid(config[key]):
            raise UserError(f"{key}={config[key]!r} is not valid: it must be {must_be}")
    for holds, message in RELATIONS:
        if not holds(config):
            raise UserError(message(config))
    refusal = OBJECTIVES[config["objective"]].refuse(config)
    if refusal:
        raise UserError(refusal)
    check_ownership(config, given, flags)
    check_capabilities(config)


ARCHITECTURE = ("model_type", "n_layer", "n_head", "n_embd", "vocab_size", "bias", "n_kv_head", "intermediate_size",
                "rope_theta")  # (dropout is not: it applies to a loaded model too)


def loaded_model_config(config, given, model, init_from):
    """The config of a run that fine-tunes a loaded model: its architecture is the model's. A flag given for it must
    agree (trained weights cannot be reshaped); the returned config records the model's values,
    so that the checkpoint says what was trained."""
    actual = {"model_type": model.model_type, **model.config_dict()}
    differ = [k for k in given if k in ARCHITECTURE and k in actual and config[k] != actual[k]
              and not (k in ("n_kv_head", "intermediate_size") and config[k] == 0)]  # 0 = the model's default
    if differ:
        what = ", ".join(f"{k}={config[k]!r} (the model has {actual[k]!r})" for k in differ)
        raise UserError(f"init_from={init_from!r}: {what}: a loaded model keeps its architecture; drop "
                         f"{' '.join('--' + k for k in differ)}, or train from scratch with --init_from=scratch")
    return {**config, **{k: actual[k] for k in ARCHITECTURE if k in actual and k in config}}


def on_resume(key):
    return CHECKS[key][2] if key in CHECKS else FREE


def resume_config(checkpoint, config, given):
    """The config of a resumed run: the checkpoint's config, with the keys the user `given` explicitly.

    A given FIXED key must equal the checkpoint's (else ValueError naming them); a given FREE key is applied and
    listed in the returned notes; every other key comes back from the checkpoint, so that a resume without the
    config file still continues the same run. LAUNCH keys are always this launch's."""
    out_dir, saved = config["out_dir"], checkpoint["config"]
    saved = upgrade({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})  # lists: ckpt.pt's tuples
    changed = [k for k in given if on_resume(k) == FIXED and k in saved and saved[k] != config[k]]
    if changed:
        what = ", ".join(f"{k}={config[k]!r} (the checkpoint has {saved[k]!r})" for k in changed)
        raise UserError(f"resume of {out_dir}: {what} cannot change on resume, it shapes the model, its LoRA or "
                         f"the data: drop {' '.join('--' + k for k in changed)} to continue the run, or start a new "
                         f"run with another --out_dir")
    resumed, notes = dict(config), []
    for key, value in saved.items():
        if key not in config or on_resume(key) == LAUNCH:
            continue
        if key not in given:
            resumed[key] = value
        elif config[key] != value:
            notes.append(f"{key}={config[key]!r} (was {value!r})")
    if checkpoint["step"] >= resumed["max_steps"]:
        raise UserError(f"{out_dir} is already trained to step {checkpoint['step']} and max_steps="
                        f"{resumed['max_steps']}: pass a larger --max_steps to train on")
    return resumed, notes
