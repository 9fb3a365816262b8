"""configurator.configure: config files and --key=value flags over train.py's defaults."""
from pathlib import Path

import pytest

from configurator import configure

ROOT = Path(__file__).resolve().parent.parent

DEFAULTS = {"batch_size": 16, "max_lr": 6e-4, "compile": True, "init_from": "scratch",
            "lora_targets": ("c_attn",), "wandb_run_name": None}


def test_flags_override_defaults_with_parsed_types():
    out = configure(DEFAULTS, ["--batch_size=8", "--compile=False", "--max_lr=1e-3", "--init_from=gpt2"])
    assert out == {"batch_size": 8, "compile": False, "max_lr": 1e-3, "init_from": "gpt2"}


def test_config_file_then_flag_applies_left_to_right(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nbatch_size = 4\nmax_lr = 3e-4\n_private = 1\n")
    assert configure(DEFAULTS, [str(cfg), "--batch_size=2"]) == {"batch_size": 2, "max_lr": 3e-4}


def test_unknown_key_is_an_error_naming_it_and_close_matches():
    with pytest.raises(ValueError, match=r"unknown config key 'batchsize'.*batch_size"):
        configure(DEFAULTS, ["--batchsize=8"])


def test_unknown_key_in_a_config_file_is_an_error(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("max_lrr = 1e-3\n")
    with pytest.raises(ValueError, match="max_lrr"):
        configure(DEFAULTS, [str(cfg)])


def test_value_of_wrong_type_is_an_error():
    with pytest.raises(TypeError, match=r"'batch_size'.*expects int.*'eight'"):
        configure(DEFAULTS, ["--batch_size=eight"])
    with pytest.raises(TypeError, match="'compile'"):
        configure(DEFAULTS, ["--compile=1"])


def test_int_is_accepted_for_a_float_key():
    assert configure(DEFAULTS, ["--max_lr=1"]) == {"max_lr": 1.0}


def test_a_flag_and_a_config_file_give_lora_targets_the_same_value(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text('lora_targets = ("q_proj", "v_proj")\n')
    flag = configure(DEFAULTS, ["""--lora_targets=("q_proj","v_proj")"""])
    assert flag == configure(DEFAULTS, [str(cfg)]) == {"lora_targets": ("q_proj", "v_proj")}
    cfg.write_text('lora_targets = r".*\\.(q|v)_proj"\n')
    assert configure(DEFAULTS, [r"--lora_targets=.*\.(q|v)_proj"]) == configure(DEFAULTS, [str(cfg)])


def test_none_default_accepts_any_value():
    assert configure(DEFAULTS, ["--wandb_run_name=exp1"]) == {"wandb_run_name": "exp1"}


def test_missing_config_file_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="config file 'config/nope.py' not found"):
        configure(DEFAULTS, ["config/nope.py"])


def train_defaults():
    """train.py's config globals, read from its config section (without running the training)."""
    source = (ROOT / "train.py").read_text()
    section = source[source.index("# settings:"):source.index("from configurator import")]
    namespace = {}
    exec(section, namespace)
    return {k: v for k, v in namespace.items() if not k.startswith("_")}


@pytest.mark.parametrize("config_file", sorted(p.name for p in (ROOT / "config").glob("*.py")))
def test_every_shipped_config_file_sets_only_known_keys_of_the_right_type(config_file):
    overrides = configure(train_defaults(), [str(ROOT / "config" / config_file)])
    assert overrides  # a config file that sets nothing is a mistake


def test_every_lora_config_field_is_a_train_key_that_reaches_lora_config():
    from dataclasses import fields

    from adapters import method
    from lora import LoRAConfig
    defaults = train_defaults()
    assert {f"lora_{f.name}" for f in fields(LoRAConfig)} <= set(defaults)
    for f in fields(LoRAConfig):  # train.py writes each one out: its default is LoRAConfig's
        assert defaults[f"lora_{f.name}"] == f.default, f.name
    settings = {**defaults, **configure(defaults, ["--lora_r=4", "--lora_rslora=True", "--lora_alpha=8",
                                                   """--lora_modules_to_save=("ln_f",)"""])}
    config = method("lora").config(settings)  # what train.py builds
    assert (config.r, config.alpha, config.rslora, config.modules_to_save) == (4, 8.0, True, ("ln_f",))
    assert config.targets == ("c_attn",) and config.mode == "split"  # LoRAConfig's defaults where nothing is set
