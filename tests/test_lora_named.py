"""Several named adapters on one model: switching gives each adapter's own logits exactly, disabling gives the
base, and add_weighted_adapter ('linear', 'cat') equals PEFT's."""
import warnings

import pytest
import torch

from lora import (LoRAConfig, active_adapter, add_weighted_adapter, adapter_layers, adapter_names, apply_lora,
                  load_adapter, lora_disabled, lora_layers, merge_and_unload, save_adapter, set_adapter)
from model import GPT

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 101
IDX = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf_gpt2")
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB,
                                                         n_positions=16, bos_token_id=0, eos_token_id=0)
                                 ).save_pretrained(path)
    return path


def ours(base_dir):
    return GPT.from_pretrained(base_dir).eval()


def logits(model):
    with torch.no_grad():
        out = model(IDX) if isinstance(model, GPT) else model(input_ids=IDX)
    return out[0] if isinstance(model, GPT) else out.logits


def trained(base_dir, seed, **config):
    model = apply_lora(ours(base_dir), LoRAConfig(**config))
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.3)
            if layer.lora_magnitude_vector is not None:
                layer.lora_magnitude_vector.mul_(1.2)
    return model


@pytest.fixture(scope="module")
def two_adapters(base_dir, tmp_path_factory):
    """Two adapters saved by single-adapter models (different targets, ranks, DoRA), with each one's logits."""
    path = tmp_path_factory.mktemp("adapters")
    a = trained(base_dir, 1, r=4, alpha=8, targets=("c_attn",))
    b = trained(base_dir, 2, r=2, alpha=4, targets=("c_attn", "c_fc"), use_dora=True)
    save_adapter(a, path / "a")
    save_adapter(b, path / "b")
    return path, {"a": logits(a), "b": logits(b)}


def test_switching_named_adapters_gives_each_adapters_logits_exactly(base_dir, two_adapters):
    path, expected = two_adapters
    model = load_adapter(ours(base_dir), path / "a", adapter_name="a")
    load_adapter(model, path / "b", adapter_name="b")
    assert adapter_names(model) == ["a", "b"] and active_adapter(model) == "a"  # loading does not switch (PEFT)
    for name in ("a", "b", "a"):
        set_adapter(model, name)
        torch.testing.assert_close(logits(model), expected[name], rtol=0, atol=0)
    with lora_disabled(model):
        torch.testing.assert_close(logits(model), logits(ours(base_dir)), rtol=0, atol=0)


def test_only_the_active_adapter_is_in_the_model_and_trains(base_dir, two_adapters):
    path, _ = two_adapters
    model = load_adapter(load_adapter(ours(base_dir), path / "a"), path / "b", adapter_name="b")
    set_adapter(model, "b")
    trainable = {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_magnitude_vector"}
    assert [n for n, _ in lora_layers(model)] == [f"transformer.h.{i}.{m}" for i in range(2)
                                                  for m in ("attn.c_attn", "mlp.c_fc")]
    set_adapter(model, "default")
    assert type(model.transformer.h[0].mlp.c_fc) is torch.nn.Linear  # "default" does not adapt c_fc
    parked = adapter_layers(model, "b")["transformer.h.0.mlp.c_fc"]
    assert model.transformer.h[0].mlp.c_fc.weight is parked.weight  # one base tensor, shared, never copied


def peft_two_adapters(base_dir, path):
    """PEFT's model with adapters a and b loaded from the folders our models saved."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.GPT2LMHeadModel.from_pretrained(base_dir)
        model = peft.PeftModel.from_pretrained(hf, path / "a", adapter_name="a")
        model.load_adapter(path / "b", adapter_name="b")
    return model.eval()


@pytest.mark.parametrize("combination_type, ranks", [("linear", (4, 4)), ("cat", (4, 2))])
def test_add_weighted_adapter_equals_peft(base_dir, tmp_path, combination_type, ranks):
    save_adapter(trained(base_dir, 1, r=ranks[0], alpha=8, targets=("c_attn",)), tmp_path / "a")
    save_adapter(trained(base_dir, 2, r=ranks[1], alpha=2, targets=("c_attn", "c_fc")), tmp_path / "b")
    reference = peft_two_adapters(base_dir, tmp_path)
    reference.add_weighted_adapter(["a", "b"], [0.7, -0.4], "mix", combination_type=combination_type)
    reference.set_adapter("mix")
    model = load_adapter(ours(base_dir), tmp_path / "a", adapter_name="a")
    load_adapter(model, tmp_path / "b", adapter_name="b")
    add_weighted_adapter(model, ["a", "b"], [0.7, -0.4], "mix", combination_type=combination_type)
    set_adapter(model, "mix")
    assert model.lora_config.r == (sum(ranks) if combination_type == "cat" else ranks[0])
    torch.testing.assert_close(logits(model), logits(reference), rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(merge_and_unload(model)), logits(reference), rtol=0, atol=1e-5)


def test_cat_combination_is_exactly_the_weighted_sum_of_updates(base_dir, tmp_path):
    model = trained(base_dir, 1, r=4, alpha=8, targets=("c_attn",))
    save_adapter(trained(base_dir, 2, r=2, alpha=2, targets=("c_attn",)), tmp_path / "b")
    load_adapter(model, tmp_path / "b", adapter_name="b")
    add_weighted_adapter(model, ["default", "b"], [0.5, 2.0], "mix", combination_type="cat")
    layers = {name: dict(lora_layers(set_adapter(model, name)))["transformer.h.0.attn.c_attn"]
              for name in ("default", "b", "mix")}
    expected = 0.5 * layers["default"].delta_weight() + 2.0 * layers["b"].delta_weight()
    torch.testing.assert_close(layers["mix"].delta_weight(), expected, rtol=1e-6, atol=1e-7)


def test_unsupported_combinations_are_named(base_dir, tmp_path):
    model = trained(base_dir, 1, r=4, alpha=8, targets=("c_attn",))
    save_adapter(trained(base_dir, 2, r=2, alpha=2, targets=("c_attn",), use_dora=True), tmp_path / "dora")
    load_adapter(model, tmp_path / "dora", adapter_name="dora")
    with pytest.raises(ValueError, match="DoRA"):
        add_weighted_adapter(model, ["default", "dora"], [1.0, 1.0], "mix")
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        set_adapter(model, "nope")
    pissa = apply_lora(ours(base_dir), LoRAConfig(r=2, targets=("c_attn",), init="pissa"))
    with pytest.raises(ValueError, match="PiSSA"):
        load_adapter(pissa, tmp_path / "dora", adapter_name="second")
    assert adapter_names(pissa) == ["default"]
