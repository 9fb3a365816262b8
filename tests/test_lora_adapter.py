"""Adapters on disk against Hugging Face PEFT itself: ours load into PEFT and PEFT's into ours, same logits."""
import json
import warnings

import pytest
import torch

from lora import (LoRAConfig, apply_lora, load_adapter, lora_layers, merge_and_unload, save_adapter)
from model import GPT

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 300
IDX = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A random Hugging Face GPT-2 (tiny, fp32) saved as a local folder."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    path = tmp_path_factory.mktemp("hf_gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def hf_gpt2(base_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval()


def our_gpt2(base_dir):
    return GPT.from_pretrained(base_dir).eval()


def peft_logits(base_dir, adapter_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(hf_gpt2(base_dir), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=IDX).logits


def our_logits(model):
    with torch.no_grad():
        return model(IDX)[0]


def trained_adapter(base_dir, **config):
    """Our GPT with LoRA whose B (and modules_to_save) are random, as after some training."""
    model = apply_lora(our_gpt2(base_dir), LoRAConfig(**config))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.3)
        for p in model.parameters():
            if p.requires_grad:  # lora_A, and the modules_to_save tensors
                p.add_(torch.randn_like(p) * 0.1)
    return model


def peft_trained_adapter(base_dir, path, **lora_config):
    """A PEFT LoRA model on Hugging Face GPT-2 with random lora_B, saved by PEFT to `path`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(hf_gpt2(base_dir), peft.LoraConfig(task_type="CAUSAL_LM", **lora_config))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.3)
        model.save_pretrained(path)
        return model.eval()(input_ids=IDX).logits


def assert_same_logits(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_our_adapter_loads_in_peft_with_identical_logits(base_dir, tmp_path):
    ours = trained_adapter(base_dir, r=4, alpha=8, targets=("c_attn",))
    save_adapter(ours, tmp_path)
    expected = peft_logits(base_dir, tmp_path)
    assert not torch.allclose(expected, our_logits(our_gpt2(base_dir)), atol=1e-3)  # the adapter does something
    assert_same_logits(our_logits(ours), expected)


def test_peft_adapter_loads_in_ours_with_identical_logits(base_dir, tmp_path):
    expected = peft_trained_adapter(base_dir, tmp_path, r=4, lora_alpha=8, target_modules=["c_attn"],
                                    fan_in_fan_out=True)
    ours = load_adapter(our_gpt2(base_dir), tmp_path)
    assert [n for n, _ in lora_layers(ours)] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert_same_logits(our_logits(ours), expected)


def test_saved_files_follow_peft_format(base_dir, tmp_path):
    save_adapter(trained_adapter(base_dir, r=4, alpha=8, targets=("c_attn",), modules_to_save=("ln_f",)), tmp_path,
                 base_model_name_or_path="gpt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8)
    assert config["fan_in_fan_out"] is True and config["base_model_name_or_path"] == "gpt2"
    from safetensors.torch import load_file
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert shapes["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"] == (4, 64)  # (r, in)
    assert shapes["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"] == (192, 4)  # (out, r)
    assert shapes["base_model.model.transformer.ln_f.weight"] == (64,)
    assert len(shapes) == 6


def test_multi_target_with_modules_to_save_round_trips_both_ways(base_dir, tmp_path):
    ours = trained_adapter(base_dir, r=4, alpha=16, targets=("c_attn", "c_proj", "c_fc"), modules_to_save=("ln_f",))
    save_adapter(ours, tmp_path / "ours")
    assert_same_logits(our_logits(ours), peft_logits(base_dir, tmp_path / "ours"))
    expected = peft_trained_adapter(base_dir, tmp_path / "peft", r=4, lora_alpha=16, fan_in_fan_out=True,
                                    target_modules=["c_attn", "c_proj", "c_fc"], modules_to_save=["ln_f"])
    assert_same_logits(our_logits(load_adapter(our_gpt2(base_dir), tmp_path / "peft")), expected)


def test_conv1d_module_to_save_is_transposed_both_ways(base_dir, tmp_path):
    ours = trained_adapter(base_dir, r=2, alpha=4, targets=("c_attn",), modules_to_save=("mlp.c_proj",))
    save_adapter(ours, tmp_path / "ours")
    assert_same_logits(our_logits(ours), peft_logits(base_dir, tmp_path / "ours"))
    expected = peft_trained_adapter(base_dir, tmp_path / "peft", r=2, lora_alpha=4, fan_in_fan_out=True,
                                    target_modules=["c_attn"], modules_to_save=["mlp.c_proj"])
    assert_same_logits(our_logits(load_adapter(our_gpt2(base_dir), tmp_path / "peft")), expected)


def test_rslora_round_trips_both_ways(base_dir, tmp_path):
    ours = trained_adapter(base_dir, r=16, alpha=8, rslora=True, targets=("c_attn",))
    save_adapter(ours, tmp_path / "ours")
    assert_same_logits(our_logits(ours), peft_logits(base_dir, tmp_path / "ours"))
    expected = peft_trained_adapter(base_dir, tmp_path / "peft", r=16, lora_alpha=8, use_rslora=True,
                                    target_modules=["c_attn"], fan_in_fan_out=True)
    loaded = load_adapter(our_gpt2(base_dir), tmp_path / "peft")
    assert loaded.transformer.h[0].attn.c_attn.scaling == 8 / 4
    assert_same_logits(our_logits(loaded), expected)


def test_regex_target_modules_from_peft_load(base_dir, tmp_path):
    expected = peft_trained_adapter(base_dir, tmp_path, r=4, lora_alpha=8, fan_in_fan_out=True,
                                    target_modules=r"transformer\.h\.1\.(attn\.c_attn|mlp\.c_fc)")
    ours = load_adapter(our_gpt2(base_dir), tmp_path)
    assert [n for n, _ in lora_layers(ours)] == ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    assert_same_logits(our_logits(ours), expected)


def test_merged_model_equals_unmerged_and_peft_merged(base_dir, tmp_path):
    ours = trained_adapter(base_dir, r=4, alpha=8, targets=("c_attn", "c_fc"))
    save_adapter(ours, tmp_path)
    unmerged = our_logits(ours)
    merged = our_logits(merge_and_unload(ours))
    assert_same_logits(merged, unmerged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = peft.PeftModel.from_pretrained(hf_gpt2(base_dir), tmp_path).merge_and_unload().eval()
    with torch.no_grad():
        assert_same_logits(merged, peft_merged(input_ids=IDX).logits)


def test_fresh_adapter_is_the_base_model_in_peft(base_dir, tmp_path):
    save_adapter(apply_lora(our_gpt2(base_dir), LoRAConfig(r=4, targets=("c_attn",))), tmp_path)
    with torch.no_grad():
        base = hf_gpt2(base_dir)(input_ids=IDX).logits
    torch.testing.assert_close(peft_logits(base_dir, tmp_path), base, rtol=0, atol=0)


def test_load_into_model_that_already_has_matching_lora(base_dir, tmp_path):
    ours = trained_adapter(base_dir, r=4, alpha=8, targets=("c_attn",))
    save_adapter(ours, tmp_path)
    target = apply_lora(our_gpt2(base_dir), LoRAConfig(r=4, alpha=8, targets=("c_attn",)))
    assert_same_logits(our_logits(load_adapter(target, tmp_path)), our_logits(ours))


def test_legacy_bin_adapter_loads_with_weights_only(base_dir, tmp_path):
    expected = peft_trained_adapter(base_dir, tmp_path, r=4, lora_alpha=8, target_modules=["c_attn"],
                                    fan_in_fan_out=True)
    from safetensors.torch import load_file
    torch.save(load_file(tmp_path / "adapter_model.safetensors"), tmp_path / "adapter_model.bin")
    (tmp_path / "adapter_model.safetensors").unlink()
    assert_same_logits(our_logits(load_adapter(our_gpt2(base_dir), tmp_path)), expected)


class NotATensor:
    def __reduce__(self):  # a pickle that would run code when unpickled
        return (print, ("pwned",))


def test_legacy_bin_with_code_is_refused(base_dir, tmp_path):
    save_adapter(trained_adapter(base_dir, r=4, alpha=8, targets=("c_attn",)), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save({"x": NotATensor()}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model.bin is not a readable weights file \(Weights only load"):
        load_adapter(our_gpt2(base_dir), tmp_path)


def edit_config(path, **changes):
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("option, value", [("use_dora", True), ("lora_bias", True), ("layers_to_transform", [0]),
                                           ("rank_pattern", {"c_attn": 8}), ("alpha_pattern", {"c_attn": 2}),
                                           ("some_future_option", 3)])
def test_unsupported_peft_option_is_refused_by_name(base_dir, tmp_path, option, value):
    save_adapter(trained_adapter(base_dir, r=4, alpha=8, targets=("c_attn",)), tmp_path)
    edit_config(tmp_path, **{option: value})
    model = our_gpt2(base_dir)
    with pytest.raises(ValueError, match=f"unsupported PEFT option {option}="):
        load_adapter(model, tmp_path)
    assert not lora_layers(model)


def test_non_lora_peft_type_is_refused(base_dir, tmp_path):
    save_adapter(trained_adapter(base_dir, r=4, alpha=8, targets=("c_attn",)), tmp_path)
    edit_config(tmp_path, peft_type="PREFIX_TUNING")
    with pytest.raises(ValueError, match="peft_type='PREFIX_TUNING'"):
        load_adapter(our_gpt2(base_dir), tmp_path)


def test_adapter_for_other_targets_than_model_lora_is_target_missing(base_dir, tmp_path):
    save_adapter(trained_adapter(base_dir, r=4, alpha=8, targets=("c_attn", "c_fc")), tmp_path)
    model = apply_lora(our_gpt2(base_dir), LoRAConfig(r=4, alpha=8, targets=("c_attn",)))
    with pytest.raises(ValueError, match=r"transformer\.h\.\[0-1\]\.mlp\.c_fc.*target module missing"):
        load_adapter(model, tmp_path)


def test_target_absent_from_model_is_named(base_dir, tmp_path):
    save_adapter(trained_adapter(base_dir, r=4, alpha=8, targets=("c_attn",)), tmp_path)
    edit_config(tmp_path, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="match no nn.Linear"):
        load_adapter(our_gpt2(base_dir), tmp_path)


def test_different_rank_than_model_lora_is_named(base_dir, tmp_path):
    save_adapter(trained_adapter(base_dir, r=4, alpha=8, targets=("c_attn",)), tmp_path)
    model = apply_lora(our_gpt2(base_dir), LoRAConfig(r=8, alpha=8, targets=("c_attn",)))
    with pytest.raises(ValueError, match="adapter has r=4.*model's transformer.h.0.attn.c_attn has r=8"):
        load_adapter(model, tmp_path)


def test_adapter_for_a_different_base_is_a_shape_error_and_leaves_model_untouched(base_dir, tmp_path):
    save_adapter(trained_adapter(base_dir, r=4, alpha=8, targets=("c_attn",)), tmp_path)
    torch.manual_seed(0)
    other_dir = tmp_path / "wider"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                         n_positions=32)).save_pretrained(other_dir)
    other = GPT.from_pretrained(other_dir)
    with pytest.raises(ValueError, match=r"c_attn.lora_A has shape \(4, 64\), the model expects \(4, 32\).*different "
                                         r"base model"):
        load_adapter(other, tmp_path)
    assert not lora_layers(other) and all(p.requires_grad for p in other.parameters())


def test_missing_folder_or_weights_are_clear_errors(base_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(our_gpt2(base_dir), tmp_path)
    save_adapter(trained_adapter(base_dir, r=4, alpha=8, targets=("c_attn",)), tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(our_gpt2(base_dir), tmp_path)


def test_save_without_lora_is_an_error(base_dir, tmp_path):
    with pytest.raises(ValueError, match="apply_lora"):
        save_adapter(our_gpt2(base_dir), tmp_path)
