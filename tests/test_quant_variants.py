"""The LoRA variants on a quantized base (quant/quantize.py): DoRA against the same DoRA on the dequantized fp32
weights, the options a quantized base refuses, and a .gguf base quantized while loading as a folder is."""
import copy

import pytest
import torch

from lora import LoRAConfig, apply_lora, lora_layers, merge_and_unload
from lora.dora import DoRAFunction
from model import GPT, GPTConfig, LLaMA, LLaMAConfig
from quant import Int8Weight, NF4Weight, QuantLinear, dequantize, quantize
from training.checkpoint import load_model

V = 97
IDX = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
TARGETS = {"gpt2": ("c_attn", "c_fc"), "llama": ("q_proj", "v_proj", "down_proj")}


def tiny(family):
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=64))
    return LLaMA(LLaMAConfig(vocab_size=V, n_embd=64, intermediate_size=128, n_layer=2, n_head=4, n_kv_head=2,
                             max_seq_len=16))


def dora_on(model, family, mode, dropout=0.0):
    torch.manual_seed(1)  # the same A for both models
    apply_lora(model, LoRAConfig(r=4, alpha=8.0, targets=TARGETS[family], use_dora=True, mode=mode, dropout=dropout))
    torch.manual_seed(2)
    with torch.no_grad():  # a trained-looking adapter: B != 0, m != ||W + s B A||
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.1)
            layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand_like(layer.lora_magnitude_vector))
    return model


@pytest.mark.parametrize("mode,dropout", [("split", 0.0), ("fused", 0.0), ("split", 0.2)])
@pytest.mark.parametrize("method", ["nf4", "int8"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dora_on_a_quantized_base_equals_dora_on_its_dequantized_fp32_weights(family, method, mode, dropout):
    """The quantized layer computes with exactly the dequantized W, so m = ||deq(W) + s B A||, the logits and every
    gradient equal DoRA on an fp32 model holding those weights, to fp32 rounding."""
    quantized = quantize(tiny(family), method)
    dense = dequantize(copy.deepcopy(quantized))  # nn.Linear layers holding the dequantized weights
    results = []
    for model in (dora_on(quantized, family, mode, dropout), dora_on(dense, family, mode, dropout)):
        model.train()
        torch.manual_seed(3)  # the same dropout masks
        logits = model(IDX)[0]
        logits.square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((model, logits, grads))
    (q_model, q_logits, q_grads), (d_model, d_logits, d_grads) = results
    assert any(isinstance(m.weight, (NF4Weight, Int8Weight)) for _, m in lora_layers(q_model))
    for (name, q), (_, d) in zip(lora_layers(q_model), lora_layers(d_model)):
        torch.testing.assert_close(q.lora_magnitude_vector, d.lora_magnitude_vector, rtol=1e-6, atol=0, msg=name)
    torch.testing.assert_close(q_logits, d_logits, rtol=1e-5, atol=1e-5)
    assert q_grads.keys() == d_grads.keys() and any(n.endswith("lora_magnitude_vector") for n in q_grads)
    for name, g in d_grads.items():
        torch.testing.assert_close(q_grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=name)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_dora_on_a_quantized_base_merges_and_unloads_to_its_own_logits(method):
    model = dora_on(quantize(tiny("llama"), method), "llama", "split").eval()
    with torch.no_grad():
        expected = model(IDX)[0]
        merged = dequantize(merge_and_unload(model))
        torch.testing.assert_close(merged(IDX)[0], expected, rtol=1e-5, atol=1e-5)


def test_dora_function_on_a_quantized_weight_passes_gradcheck_in_float64():
    torch.manual_seed(0)
    t = dict(dtype=torch.float64, requires_grad=True)
    qweight = NF4Weight(torch.randn(5, 64, dtype=torch.float64))  # dequantizes to float64
    x, b, A, B, m = torch.randn(2, 3, 64, **t), torch.randn(5, **t), torch.randn(2, 64, **t), torch.randn(5, 2, **t), \
        torch.rand(5, **t) + 0.5
    norm = torch.linalg.norm(qweight.dequantize() + 1.5 * B @ A, dim=1).detach()
    assert torch.autograd.gradcheck(lambda x, b, A, B, m: DoRAFunction.apply(x, qweight, b, A, B, m, 1.5, norm),
                                    (x, b, A, B, m))


# ---- what a quantized base refuses, before the model changes ------------------------------------------------------
def assert_refused_untouched(model, config, match):
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        apply_lora(model, config)
    assert not lora_layers(model) and not hasattr(model, "lora_config")
    assert trainable == {n: p.requires_grad for n, p in model.named_parameters()}  # apply_lora would freeze them


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2"])
def test_pissa_on_a_quantized_base_is_a_one_line_error_naming_it(init):
    model = quantize(tiny("gpt2"), "nf4")
    assert_refused_untouched(model, LoRAConfig(r=2, targets=("c_attn", "lm_head"), init=init),
                             rf"^init='{init}' cannot start from a quantized base \(nf4: [^\n]*$")
    assert isinstance(model.transformer.h[0].attn.c_attn, QuantLinear)


def test_pissa_on_a_full_precision_layer_of_a_quantized_model_still_works():
    model = quantize(tiny("llama"), "int8")  # lm_head is skipped: full precision, untied
    with torch.no_grad():
        before = model(IDX)[0]
        apply_lora(model, LoRAConfig(r=2, targets=("lm_head",), init="pissa"))
        torch.testing.assert_close(model(IDX)[0], before, rtol=1e-4, atol=1e-4)


def test_modules_to_save_holding_a_quantized_layer_is_a_one_line_error_naming_it():
    model = quantize(tiny("llama"), "nf4")
    assert_refused_untouched(model, LoRAConfig(r=2, targets=("q_proj",), modules_to_save=("self_attn",)),
                             r"^modules_to_save model\.layers\.\[0-1\]\.self_attn hold quantized [^\n]*$")
    apply_lora(model, LoRAConfig(r=2, targets=("q_proj",), modules_to_save=("norm",)))  # an RMSNorm trains fully
    assert model.model.norm.weight.requires_grad


# ---- a .gguf base, quantized while loading ------------------------------------------------------------------------
@pytest.mark.parametrize("qtype,tied", [("F32", False), ("Q8_0", True)])
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_gguf_base_quantizes_as_the_same_weights_in_a_folder_do(tmp_path, method, qtype, tied):
    gguf_tests = pytest.importorskip("test_gguf")  # skips without the gguf or transformers package
    from formats.gguf import convert_gguf
    path = gguf_tests.write_gguf(tmp_path / "tiny.gguf", gguf_tests.make_hf_llama(tied),
                                 gguf_tests.gguf.GGMLQuantizationType[qtype])
    ours = load_model(path, quantize=method)
    folder = load_model(convert_gguf(path, tmp_path / "hf"), quantize=method)
    quantized = [n for n, m in ours.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 14 and all(m.weight.method == method for m in ours.modules() if isinstance(m, QuantLinear))
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    assert ours.state_dict().keys() == folder.state_dict().keys()
    for k, v in folder.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    idx = gguf_tests.IDX
    with torch.no_grad():
        logits = ours(idx)[0]
        assert torch.equal(logits, folder(idx)[0])
        assert (logits - load_model(path)(idx)[0]).abs().max() > 1e-4  # quantized, not the fp32 model
