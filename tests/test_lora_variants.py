"""DoRA, PiSSA, rsLoRA and LoRA+ against PEFT itself, on transformers' GPT-2 and LLaMA: same weights, same logits
(and for DoRA the same gradients); adapters cross over both ways; hand-written backwards pass gradcheck."""
import json
import warnings

import pytest
import torch
import torch.nn as nn

from lora import LoRAConfig, apply_lora, load_adapter, lora_layers, lora_state_dict, merge_and_unload, save_adapter
from lora import merge_lora, unmerge_lora
from lora.dora import DoRAFunction
from lora.pissa import saved_factors
from model import load_pretrained
from training.optim import configure_adamw

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 101
IDX = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
TARGETS = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def base(request, tmp_path_factory):
    """(arch, folder) of a tiny random Hugging Face model of that architecture."""
    torch.manual_seed(0)
    if request.param == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB,
                                                                  n_positions=16, bos_token_id=0, eos_token_id=0))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16, initializer_range=0.2, tie_word_embeddings=False))
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, path


def hf_model(base):
    return transformers.AutoModelForCausalLM.from_pretrained(base[1]).eval()


def our_model(base):
    return load_pretrained(base[1]).eval()


def peft_model(base, **config):
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS[base[0]], fan_in_fan_out=base[0] == "gpt2",
                  task_type="CAUSAL_LM") | config
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(hf_model(base), peft.LoraConfig(**config)).eval()


def our_config(base, **config):
    return LoRAConfig(**(dict(r=4, alpha=8, targets=tuple(TARGETS[base[0]])) | config))


def peft_tensor(peft_model, layer_name, part):
    """PEFT's tensor for our layer `layer_name`: part is lora_A, lora_B or lora_magnitude_vector."""
    return peft_model.get_parameter(f"base_model.model.{layer_name}.{part}.default.weight")


def randomize(model, seed=1):
    """A trained-looking adapter: random B (fresh B is zero) and nudged A and magnitudes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.3)
            layer.lora_A.add_(torch.randn_like(layer.lora_A) * 0.1)
            if layer.lora_magnitude_vector is not None:
                layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand_like(layer.lora_magnitude_vector))
    return model


def copy_peft_into_ours(pm, ours):
    with torch.no_grad():
        for name, layer in lora_layers(ours):
            for part in ("lora_A", "lora_B") + (("lora_magnitude_vector",) if layer.lora_magnitude_vector is not None
                                                 else ()):
                getattr(layer, part).copy_(peft_tensor(pm, name, part))
    return ours


def logits(model):
    out = model(input_ids=IDX) if isinstance(model, (peft.PeftModel, transformers.PreTrainedModel)) else model(IDX)
    return out.logits if hasattr(out, "logits") else out[0]


def assert_logits_equal(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def peft_from_pretrained(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(hf_model(base), path).eval()


# --- DoRA ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["split", "fused"])
def test_dora_logits_and_gradients_of_A_B_m_equal_peft(base, mode):
    pm = randomize(peft_model(base, use_dora=True, init_lora_weights=False), seed=1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand_like(p))  # m != ||W + s B A||, so that g != 1 matters
    ours = copy_peft_into_ours(pm, apply_lora(our_model(base), our_config(base, use_dora=True, mode=mode)))
    ref, got = logits(pm), logits(ours)
    assert (ref - logits(hf_model(base))).abs().max() > 1e-2  # the adapter changes the model
    assert_logits_equal(got, ref)
    ref.square().mean().backward()
    got.square().mean().backward()
    for name, layer in lora_layers(ours):
        for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
            expected = peft_tensor(pm, name, part).grad
            torch.testing.assert_close(getattr(layer, part).grad, expected, rtol=1e-4,
                                       atol=1e-4 * expected.abs().max().item())


def test_dora_function_passes_gradcheck_float64_with_the_norm_held_constant():
    torch.manual_seed(0)
    t = dict(dtype=torch.float64, requires_grad=True)
    x, W, b = torch.randn(2, 3, 4, **t), torch.randn(5, 4, **t), torch.randn(5, **t)
    A, B, m = torch.randn(2, 4, **t), torch.randn(5, 2, **t), torch.rand(5, **t) + 0.5
    norm = torch.linalg.norm(W + 1.5 * B @ A, dim=1).detach()  # DoRA's detached ||V||: a constant to gradcheck
    assert torch.autograd.gradcheck(lambda *a: DoRAFunction.apply(*a, 1.5, norm), (x, W, b, A, B, m))
    assert torch.autograd.gradcheck(lambda x, W, A, B, m: DoRAFunction.apply(x, W, None, A, B, m, 1.5, norm),
                                    (x, W, A, B, m))
    y = DoRAFunction.apply(x, W, b, A, B, m, 1.5)  # without `norm` it computes the same constant itself
    torch.testing.assert_close(y, DoRAFunction.apply(x, W, b, A, B, m, 1.5, norm), rtol=0, atol=1e-12)


def test_dora_fused_saves_no_weight_sized_tensor():
    ours = apply_lora(nn.Sequential(nn.Linear(8, 6)), LoRAConfig(r=2, targets=("0",), use_dora=True, mode="fused"))
    x = torch.randn(5, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ours(x)
    params = {p.data_ptr() for p in ours.parameters()}
    # x (N, in), z (N, out), g and ||V|| (out,): nothing (out, in) besides the parameters themselves
    assert sorted(tuple(t.shape) for t in saved if t.data_ptr() not in params) == [(5, 6), (5, 8), (6,), (6,)]


def test_dora_merged_equals_unmerged_and_unmerge_restores_weight(base):
    ours = randomize(apply_lora(our_model(base), our_config(base, use_dora=True)))
    weights = {n: l.weight.clone() for n, l in lora_layers(ours)}
    expected = logits(ours)
    merge_lora(ours)
    assert_logits_equal(logits(ours), expected)
    unmerge_lora(ours)
    for n, layer in lora_layers(ours):
        torch.testing.assert_close(layer.weight, weights[n], rtol=0, atol=1e-6)
    assert_logits_equal(logits(merge_and_unload(ours)), expected)


def test_our_dora_adapter_loads_in_peft_and_peft_dora_adapter_in_ours(base, tmp_path):
    ours = randomize(apply_lora(our_model(base), our_config(base, use_dora=True)))
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["use_dora"] is True
    assert_logits_equal(logits(peft_from_pretrained(base, tmp_path / "ours")), logits(ours))
    pm = randomize(peft_model(base, use_dora=True, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(our_model(base), tmp_path / "peft")
    assert all(layer.lora_magnitude_vector is not None for _, layer in lora_layers(loaded))
    assert_logits_equal(logits(loaded), logits(pm))


# --- PiSSA --------------------------------------------------------------------------------------------------------

def test_pissa_init_gives_peft_factors_and_residual_and_keeps_the_model(base):
    pm = peft_model(base, init_lora_weights="pissa")
    ours = apply_lora(our_model(base), our_config(base, init="pissa"))
    assert_logits_equal(logits(ours), logits(hf_model(base)))  # W_res + s B0 A0 = W
    peft_weights = dict(pm.named_parameters())
    for name, layer in lora_layers(ours):
        for part in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(layer, part), peft_tensor(pm, name, part), rtol=0, atol=1e-5)
        residual = peft_weights[f"base_model.model.{name}.base_layer.weight"]
        torch.testing.assert_close(layer.weight, residual.t() if base[0] == "gpt2" else residual, rtol=0, atol=1e-5)


def test_pissa_niter_uses_svd_lowrank_as_peft(base, monkeypatch):
    real = torch.svd_lowrank
    seeded = lambda W, q, niter: (torch.manual_seed(3), real(W, q=q, niter=niter))[1]  # noqa: E731
    monkeypatch.setattr(torch, "svd_lowrank", seeded)
    monkeypatch.setattr(peft.tuners.lora.layer, "svd_lowrank", seeded)
    pm = peft_model(base, init_lora_weights="pissa_niter_2")
    ours = apply_lora(our_model(base), our_config(base, init="pissa_niter_2"))
    for name, layer in lora_layers(ours):
        torch.testing.assert_close(layer.lora_A, peft_tensor(pm, name, "lora_A"), rtol=0, atol=1e-5)
    assert_logits_equal(logits(ours), logits(pm))


def test_our_trained_pissa_adapter_is_saved_as_plain_lora_on_the_original_base_for_peft(base, tmp_path):
    ours = randomize(apply_lora(our_model(base), our_config(base, init="pissa", rslora=True)))
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (8, True)
    assert_logits_equal(logits(peft_from_pretrained(base, tmp_path)), logits(ours))
    assert_logits_equal(logits(load_adapter(our_model(base), tmp_path)), logits(ours))


@pytest.mark.parametrize("converted", [True, False])
def test_peft_trained_pissa_adapter_loads_in_ours(base, tmp_path, converted):
    pm = peft_model(base, init_lora_weights="pissa")
    if converted:  # PEFT's recipe: save the untrained init first, then the trained adapter relative to it
        pm.save_pretrained(tmp_path / "init")
    randomize(pm)
    pm.save_pretrained(tmp_path / "trained",
                       path_initial_model_for_weight_conversion=str(tmp_path / "init") if converted else None)
    assert_logits_equal(logits(load_adapter(our_model(base), tmp_path / "trained")), logits(pm))


def test_pissa_state_dict_rebuilds_the_same_residual_without_a_new_svd(base):
    config = our_config(base, init="pissa_niter_1")  # randomized: a second SVD would give another residual
    ours = randomize(apply_lora(our_model(base), config))
    state = lora_state_dict(ours)
    torch.manual_seed(123)
    again = apply_lora(our_model(base), config, pissa_factors=saved_factors(state))
    again.load_state_dict(state, strict=False)
    torch.testing.assert_close(logits(again), logits(ours), rtol=0, atol=0)


# --- rsLoRA and LoRA+ ---------------------------------------------------------------------------------------------

def test_rslora_logits_equal_peft(base):
    pm = randomize(peft_model(base, r=16, lora_alpha=8, use_rslora=True))
    ours = copy_peft_into_ours(pm, apply_lora(our_model(base), our_config(base, r=16, rslora=True)))
    assert lora_layers(ours)[0][1].scaling == 2.0
    assert_logits_equal(logits(ours), logits(pm))


def test_loraplus_groups_and_training_equal_peft_create_loraplus_optimizer(base):
    from peft.optimizers import create_loraplus_optimizer
    extra = dict(modules_to_save=["ln_f"]) if base[0] == "gpt2" else {}  # a 1-D LayerNorm: lr * ratio, no decay
    pm = randomize(peft_model(base, **extra))
    ours = copy_peft_into_ours(pm, apply_lora(our_model(base), our_config(base, loraplus_lr_ratio=16.0, **extra)))
    ours.train()
    ref_opt = create_loraplus_optimizer(pm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                        loraplus_weight_decay=0.1, betas=(0.9, 0.95))
    our_opt = configure_adamw(ours, 0.1, 1e-3, (0.9, 0.95), "cpu", verbose=False)
    ours_lr = {id(p): (g["lr"], g["weight_decay"]) for g in our_opt.param_groups for p in g["params"]}
    ref_lr = {id(p): (g["lr"], g["weight_decay"]) for g in ref_opt.param_groups for p in g["params"]}
    trainable = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trainable) == len(ref_lr)
    for name, p in trainable:  # PEFT's name for it: <layer>.lora_A.default.weight, ln_f.modules_to_save.default.*
        module, _, tensor = name.rpartition(".")
        peft_name = (f"{name}.default.weight" if tensor.startswith("lora_") else
                     f"{module}.modules_to_save.default.{tensor}")
        assert ours_lr[id(p)] == pytest.approx(ref_lr[id(pm.get_parameter("base_model.model." + peft_name))]), name
    targets = torch.roll(IDX, -1, 1)
    for _ in range(3):
        for model, opt in ((pm, ref_opt), (ours, our_opt)):
            out = logits(model)
            nn.functional.cross_entropy(out.reshape(-1, VOCAB), targets.reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
    assert_logits_equal(logits(ours.eval()), logits(pm.eval()))
