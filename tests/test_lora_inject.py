"""apply_lora and its bookkeeping on GPT-2, LLaMA-style and Flamingo-style module trees."""
import re
import warnings

import pytest
import torch
import torch.nn as nn

from lora import (LoRAConfig, LoRALinear, apply_lora, count_parameters, lora_disabled, lora_layers,
                  lora_state_dict, mark_only_lora_trainable, merge_and_unload, merge_lora, print_trainable_parameters,
                  remove_lora, set_lora_mode, summary, unmerge_lora)
from model import GPT, GPTConfig


def tiny_gpt(n_layer=2, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=n_layer, n_head=2, n_embd=32)).to(dtype).eval()


def randomize_B(model, seed=1):
    """A fresh adapter is B = 0 (a no-op); give it a real update so comparisons mean something."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.5)
    return model


IDX = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))


class ToyLlamaLayer(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.self_attn = nn.ModuleDict({n: nn.Linear(d, d, bias=False) for n in ("q_proj", "k_proj", "v_proj",
                                                                                   "o_proj")})
        self.mlp = nn.ModuleDict({n: nn.Linear(d, d, bias=False) for n in ("gate_proj", "up_proj", "down_proj")})


class FlamingoBlock(nn.Module):
    """Gated cross-attention block: to_q, to_kv, to_out and a feed-forward Sequential(LN, Linear, GELU, Linear)."""

    def __init__(self, d=16):
        super().__init__()
        self.to_q, self.to_kv, self.to_out = nn.Linear(d, d, bias=False), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.ff = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


def test_apply_lora_replaces_targets_in_place_and_keeps_names():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=4, targets=("c_attn",)))
    assert [n for n, _ in lora_layers(model)] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert "transformer.h.0.attn.c_attn.weight" in model.state_dict()


def test_base_checkpoint_loads_into_adapted_model():
    base_state = tiny_gpt(seed=3).state_dict()
    model = apply_lora(tiny_gpt(), LoRAConfig(r=4, targets=("c_attn", "c_fc")))
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    assert unexpected == [] and all(k.endswith((".lora_A", ".lora_B")) for k in missing) and len(missing) == 8
    torch.testing.assert_close(model.transformer.h[1].attn.c_attn.weight,
                               base_state["transformer.h.1.attn.c_attn.weight"])


def test_fresh_adapter_leaves_logits_unchanged():
    model = tiny_gpt()
    expected, _ = model(IDX)
    apply_lora(model, LoRAConfig(r=4, targets=("c_attn", "c_proj", "c_fc")))
    torch.testing.assert_close(model(IDX)[0], expected, rtol=0, atol=0)


def test_only_lora_parameters_are_trainable():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=4, targets=("c_attn",)))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"transformer.h.{i}.attn.c_attn.lora_{ab}" for i in range(2) for ab in "AB"]
    _, loss = model.train()(IDX, IDX)
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def test_modules_to_save_stay_trainable_and_are_in_lora_state_dict():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=4, targets=("c_attn",), modules_to_save=("ln_f",)))
    assert model.transformer.ln_f.weight.requires_grad and model.transformer.ln_f.bias.requires_grad
    assert sorted(lora_state_dict(model)) == sorted(
        [f"transformer.h.{i}.attn.c_attn.lora_{ab}" for i in range(2) for ab in "AB"]
        + ["transformer.ln_f.weight", "transformer.ln_f.bias"])


def test_mark_only_lora_trainable_refreezes_everything_else():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=4, targets=("c_fc",)))
    for p in model.parameters():
        p.requires_grad_(True)
    mark_only_lora_trainable(model)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}


def test_llama_style_names():
    model = nn.ModuleDict({"layers": nn.ModuleList([ToyLlamaLayer() for _ in range(3)])})
    apply_lora(model, LoRAConfig(r=2, targets=["q_proj", "v_proj"]))
    names = [n for n, _ in lora_layers(model)]
    assert names == [f"layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "v_proj")]


def test_flamingo_style_block_with_sequential_indices():
    model = nn.ModuleList([FlamingoBlock() for _ in range(2)])
    apply_lora(model, LoRAConfig(r=2, targets=("to_q", "to_kv", "to_out", "ff.1", "ff.3")))
    for block in model:
        assert all(isinstance(m, LoRALinear) for m in (block.to_q, block.to_kv, block.to_out, block.ff[1],
                                                       block.ff[3]))
        assert isinstance(block.ff[0], nn.LayerNorm) and isinstance(block.ff[2], nn.GELU)
    assert model[0].to_kv.bias is not None and model[0].to_q.bias is None
    y = model[0].ff(torch.randn(3, 16))  # the Sequential still runs
    assert y.shape == (3, 16)


def test_regex_target_must_match_the_whole_name():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2, targets=r"transformer\.h\.1\.(attn\.c_attn|mlp\.c_fc)"))
    assert [n for n, _ in lora_layers(model)] == ["transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    with pytest.raises(ValueError, match="match no nn.Linear"):
        apply_lora(tiny_gpt(), LoRAConfig(r=2, targets="c_attn"))  # fullmatch: "c_attn" is not a full name


def test_names_written_as_one_comma_separated_string_are_refused_with_the_list_to_write():
    with pytest.raises(ValueError, match=re.escape("give a list: ('q_proj', 'v_proj')")):
        LoRAConfig(targets="q_proj,v_proj")
    assert LoRAConfig(targets=r"h\.[0-9]{1,2}\.c_attn").targets  # a comma inside a regex quantifier is fine


def test_list_target_matches_dotted_suffix_not_substring():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2, targets=("attn.c_proj",)))
    assert [n for n, _ in lora_layers(model)] == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    with pytest.raises(ValueError, match="match no nn.Linear"):
        apply_lora(tiny_gpt(), LoRAConfig(r=2, targets=("attn",)))  # a container, not a Linear
    with pytest.raises(ValueError, match="match no nn.Linear"):
        apply_lora(tiny_gpt(), LoRAConfig(r=2, targets=("_attn",)))  # "c_attn" does not end with "._attn"


def test_no_match_error_lists_existing_linears_collapsed():
    with pytest.raises(ValueError) as err:
        apply_lora(tiny_gpt(n_layer=12), LoRAConfig(r=2, targets=("q_proj",)))
    msg = str(err.value)
    assert "transformer.h.[0-11].attn.c_attn" in msg and "transformer.h.[0-11].mlp.c_proj" in msg
    assert "lm_head" in msg and "h.3." not in msg


def test_targeting_a_non_linear_leaf_is_an_error():
    with pytest.raises(ValueError, match=re.escape("transformer.wte (Embedding)")):
        apply_lora(tiny_gpt(), LoRAConfig(r=2, targets=("c_attn", "wte")))


def test_applying_twice_is_an_error():
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2))
    with pytest.raises(ValueError, match="already has 2 LoRA layers"):
        apply_lora(model, LoRAConfig(r=2, targets=("c_fc",)))


def test_bad_config_values_are_named():
    for bad, word in [(dict(r=0), "r"), (dict(mode="fast"), "mode"), (dict(targets=()), "targets"),
                      (dict(mode="fused", dropout=0.1), "fused")]:
        with pytest.raises(ValueError, match=word):
            LoRAConfig(**bad)


def test_fused_mode_gives_same_logits_and_grads_as_split_float64():
    results = []
    for mode in ("split", "fused"):
        model = randomize_B(apply_lora(tiny_gpt(dtype=torch.float64), LoRAConfig(r=4, targets=("c_attn", "c_fc"))))
        set_lora_mode(model, mode)
        logits, loss = model(IDX, IDX)
        loss.backward()
        results.append([logits] + [p.grad for p in model.parameters() if p.requires_grad])
    for s, f in zip(*results):
        torch.testing.assert_close(f, s, rtol=1e-10, atol=1e-12)


def test_merge_lora_keeps_logits_and_unmerge_restores_weights():
    model = randomize_B(apply_lora(tiny_gpt(), LoRAConfig(r=4, targets=("c_attn", "c_proj"))))
    weights = {n: p.clone() for n, p in model.named_parameters()}
    expected, _ = model(IDX)
    merge_lora(model)
    torch.testing.assert_close(model(IDX)[0], expected, rtol=1e-4, atol=1e-5)
    unmerge_lora(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)


def test_merge_and_unload_gives_plain_linears_with_same_logits():
    model = randomize_B(apply_lora(tiny_gpt(), LoRAConfig(r=4, targets=("c_attn", "c_fc"))))
    expected, _ = model(IDX)
    merge_and_unload(model)
    assert not lora_layers(model) and type(model.transformer.h[0].attn.c_attn) is nn.Linear
    assert set(model.state_dict()) == set(tiny_gpt().state_dict())
    torch.testing.assert_close(model(IDX)[0], expected, rtol=1e-4, atol=1e-5)


def test_lora_disabled_runs_the_base_model():
    model = tiny_gpt()
    base_logits, _ = model(IDX)
    randomize_B(apply_lora(model, LoRAConfig(r=4, targets=("c_attn",))))
    adapted, _ = model(IDX)
    assert not torch.allclose(adapted, base_logits)
    with lora_disabled(model):
        torch.testing.assert_close(model(IDX)[0], base_logits, rtol=0, atol=0)
    torch.testing.assert_close(model(IDX)[0], adapted, rtol=0, atol=0)


def test_remove_lora_gives_back_the_base_model():
    model = tiny_gpt()
    base_logits, _ = model(IDX)
    remove_lora(randomize_B(apply_lora(model, LoRAConfig(r=4, targets=("c_attn",)))))
    assert not lora_layers(model)
    torch.testing.assert_close(model(IDX)[0], base_logits, rtol=0, atol=0)


def test_tied_lm_head_target_warns_keeps_tie_refuses_merge_and_unties_on_unload():
    model = tiny_gpt()
    with pytest.warns(UserWarning, match="tied to transformer.wte.weight"):
        apply_lora(model, LoRAConfig(r=4, targets=("lm_head",)))
    assert model.lm_head.weight is model.transformer.wte.weight
    randomize_B(model)
    expected, _ = model(IDX)
    with pytest.raises(RuntimeError, match="tied"):
        merge_lora(model)
    wte_before = model.transformer.wte.weight.clone()
    merge_and_unload(model)
    assert model.lm_head.weight is not model.transformer.wte.weight
    torch.testing.assert_close(model.transformer.wte.weight, wte_before, rtol=0, atol=0)
    torch.testing.assert_close(model(IDX)[0], expected, rtol=1e-4, atol=1e-5)


def test_gpt2_124m_count_matches_peft_line():
    # PEFT prints exactly this for Hugging Face's GPT-2 124M with LoraConfig(r=8, target_modules=["c_attn"])
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50257))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_lora(model, LoRAConfig(r=8, targets=("c_attn",)))
    line = print_trainable_parameters(model)
    assert line == "trainable params: 294,912 || all params: 124,734,720 || trainable%: 0.2364"


def test_counts_match_peft_on_a_random_hf_gpt2(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300,
                                                              n_positions=32))
    hf.save_pretrained(tmp_path)
    ours = apply_lora(GPT.from_pretrained(tmp_path), LoRAConfig(r=4, targets=("c_attn", "c_proj")))
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"],
                                                         fan_in_fan_out=True))
    assert count_parameters(ours) == peft_model.get_nb_trainable_parameters()
    capsys.readouterr()
    peft_model.print_trainable_parameters()
    assert print_trainable_parameters(ours) + "\n" == capsys.readouterr().out.splitlines(keepends=True)[0]


def test_summary_collapses_identical_blocks_and_marks_lora():
    model = apply_lora(tiny_gpt(n_layer=12), LoRAConfig(r=4, targets=("c_attn",)))
    text = summary(model)
    assert "0-11  Block  x12" in text
    assert re.search(r"c_attn  LoRA\(32 -> 96, r=4, alpha=16, split\)  \* trainable: lora_A, lora_B", text)
    assert "c_fc  Linear(32 -> 128)" in text and "trainable" not in text.split("c_fc")[1].splitlines()[0]
    assert "tied to transformer.wte.weight" in text
    assert len(text.splitlines()) < 20


def test_summary_does_not_collapse_blocks_that_differ():
    model = apply_lora(tiny_gpt(n_layer=4), LoRAConfig(r=4, targets=r"transformer\.h\.[23]\.attn\.c_attn"))
    text = summary(model)
    assert "0-1  Block  x2" in text and "2-3  Block  x2" in text
