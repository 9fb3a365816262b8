"""The quantized base (quant/quantize.py) against bitsandbytes, autograd, gradcheck, transformers + PEFT."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import (FusedLoRALinear, LoRAConfig, LoRALinear, apply_lora, lora_layers, merge_and_unload, merge_lora,
                  remove_lora)
from model import GPT, GPTConfig, LLaMA, LLaMAConfig
from test_train_lora import hf_gpt2_base  # noqa: F401 (a fixture: a GPT-2 trained briefly, as an HF folder)
from quant import (DYNAMIC, NF4, Int8Weight, NF4Weight, QuantLinear, dequantize, load_quantized, quantize,
                         quantized_bytes)

try:
    import bitsandbytes.functional as bnb
except ImportError as e:  # the test-only reference (requirements-dev.txt)
    bnb, BNB_MISSING = None, f"bitsandbytes cannot be imported ({e}): pip install -r requirements-dev.txt"
needs_bnb = pytest.mark.skipif(bnb is None, reason=globals().get("BNB_MISSING", ""))
SHAPES = [(192, 64), (37, 51), (3, 7)]  # 64-blocks, 256-groups of blocks, and sizes that divide by neither


@pytest.fixture(autouse=True, scope="module")
def eager_bitsandbytes():
    """bnb wraps its CPU dequantize in torch.compile(dynamic=False): seconds of compiling per new shape. The same
    code runs eagerly with dynamo off."""
    with torch._dynamo.config.patch(disable=True):
        yield


def weight(shape, seed=0, dtype=torch.float32):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


def bnb_nf4(w, double=True):
    return bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double)


# ---- against bitsandbytes -----------------------------------------------------------------------------------------
@needs_bnb
def test_nf4_levels_and_the_dynamic_map_equal_bitsandbytes_tables():
    assert torch.equal(NF4, bnb.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC, bnb.create_dynamic_map())


@needs_bnb
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_packed_codes_equal_bitsandbytes_byte_for_byte(shape):
    w = weight(shape)
    packed, _ = bnb_nf4(w)
    assert torch.equal(NF4Weight(w).codes, packed.view(-1))


@needs_bnb
@pytest.mark.parametrize("shape", SHAPES + [(300, 1000)])
def test_our_dequantize_of_bitsandbytes_double_quantized_state_gives_its_weight(shape):
    """Decoding: the same bytes, 8-bit absmax codes, group absmax and mean give the weight bnb gives, to 1e-6."""
    w = weight(shape)
    packed, state = bnb_nf4(w)
    ours = NF4Weight(w)
    ours.absmax_codes.copy_(state.absmax)
    assert torch.equal(ours.absmax_scale, state.state2.absmax) and torch.equal(ours.absmax_mean, state.offset)
    assert (ours.dequantize() - bnb.dequantize_4bit(packed, state)).abs().max() <= 1e-6


def bnb_cpu_lookup_table_codes(scaled, code):
    """bitsandbytes' CPU kernel (csrc/cpu_ops.cpp, quantize_cpu_impl), transcribed: it does not search the 256 codes
    for each value; it rounds the value to one of 65,536 evenly spaced points of [-1, 1] and reads a table that
    holds, for each point, the first code whose upper midpoint is not below it. All in fp32, as the C code."""
    midpoints = 0.5 * (code[:-1] + code[1:])  # (255,)
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535  # (65536,) the table's points
    table = torch.searchsorted(midpoints, grid, side="left")  # count of midpoints < point
    point = ((scaled.clamp(-1, 1) + 1.0) * 0.5 * 65535 + 0.5).long()  # the C cast to uint16 truncates
    return table[point].to(torch.uint8)


def centred_block_absmax(w):
    """What the double quantization quantizes: the 64-block absmax minus its mean, over 256-block groups, in [-1, 1]."""
    absmax = bnb_nf4(w, double=False)[1].absmax  # (n_blocks,) fp32
    centred = F.pad(absmax - absmax.mean(), (0, -absmax.numel() % 256)).view(-1, 256)  # (n_groups, 256)
    return (centred * (1.0 / centred.abs().amax(dim=1, keepdim=True))).view(-1)[: absmax.numel()], absmax.numel()


@needs_bnb
@pytest.mark.parametrize("seed", range(4))
def test_bitsandbytes_cpu_absmax_codes_are_its_65536_point_lookup_table_not_the_nearest_code(seed):
    """Why the double-quantized absmax codes cannot equal bnb's CPU ones and stay nearest: bnb's CPU answer is the
    table's (reproduced here byte for byte), which takes the farther neighbour within half a table step (1/65535) of
    a midpoint. Ours is the nearest code, as bnb's CUDA kernel's midpoint search gives it."""
    w = weight((256, 1024), seed)  # 4,096 blocks in 16 groups
    _, state = bnb_nf4(w)
    scaled, n_blocks = centred_block_absmax(w)
    assert torch.equal(bnb_cpu_lookup_table_codes(scaled, DYNAMIC), state.absmax)
    distance = (scaled.double()[:, None] - DYNAMIC.double()[None, :]).abs()  # (n_blocks, 256)
    ours = NF4Weight(w).absmax_codes.long()
    assert torch.all(distance.gather(1, ours[:, None]).squeeze(1) <= distance.min(dim=1).values)


@needs_bnb
def test_nf4_double_quantized_weight_equals_bitsandbytes_but_where_its_table_rounds_past_a_midpoint():
    """The bound on the difference: other blocks equal bnb's weights to 1e-6; a differing block is under 1% of them,
    its code is bnb's neighbour, its centred absmax lies within a table step of their midpoint, and ours is the
    nearer of the two to the true absmax."""
    w = weight((256, 1024))
    packed, state = bnb_nf4(w)
    ours = NF4Weight(w)
    err = (ours.dequantize().view(-1) - bnb.dequantize_4bit(packed, state).view(-1)).abs()  # (n,), 64 | n here
    differ = ours.absmax_codes != state.absmax  # (n_blocks,)
    assert err.view(-1, 64)[~differ].max() <= 1e-6
    assert 0 < differ.float().mean() < 0.01
    assert torch.all((ours.absmax_codes[differ].int() - state.absmax[differ].int()).abs() == 1)  # neighbours
    scaled, _ = centred_block_absmax(w)
    midpoint = (DYNAMIC[ours.absmax_codes.long()] + DYNAMIC[state.absmax.long()]) / 2
    assert (scaled - midpoint)[differ].abs().max() <= 1 / 65535 + 1e-7
    assert torch.all((DYNAMIC[ours.absmax_codes.long()] - scaled)[differ].abs()
                     <= (DYNAMIC[state.absmax.long()] - scaled)[differ].abs())


@needs_bnb
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_codes_and_row_absmax_equal_bitsandbytes_vectorwise_quant(shape):
    w = weight(shape)
    codes, row_absmax, _ = bnb.int8_vectorwise_quant(w)
    ours = Int8Weight(w)
    assert torch.equal(ours.codes, codes) and torch.equal(ours.row_absmax, row_absmax)
    assert (ours.dequantize() - codes.float() * row_absmax[:, None] / 127).abs().max() <= 1e-6


def test_nf4_with_double_quantization_costs_4_127_bits_per_weight():
    # 4 (code) + 8/64 (8-bit absmax per block) + 32/(64*256) (fp32 absmax per group) + 32/n (the mean)
    w = weight((256, 4096))  # 16,384 blocks in 64 full groups
    bits = 8 * NF4Weight(w).nbytes() / w.numel()
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / w.numel(), abs=1e-9)
    assert bits == pytest.approx(4.127, abs=1e-3)


def test_an_all_zero_weight_dequantizes_to_zeros_not_nan():
    for qweight in (NF4Weight(torch.zeros(4, 64)), Int8Weight(torch.zeros(4, 64))):
        assert torch.equal(qweight.dequantize(), torch.zeros(4, 64))


# ---- QuantLinear and LoRA on it -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quant_linear_dx_equals_autograd_through_the_dequantized_weight(method):
    layer = QuantLinear.from_linear(nn.Linear(64, 48), method)
    x = torch.randn(2, 5, 64, requires_grad=True)
    dy = torch.randn(2, 5, 48)
    (dx,) = torch.autograd.grad(layer(x), x, dy)
    x_ref = x.detach().requires_grad_()
    (dx_ref,) = torch.autograd.grad(F.linear(x_ref, layer.dequantize(), layer.bias), x_ref, dy)
    assert torch.allclose(dx, dx_ref, atol=1e-6)
    assert not layer.bias.requires_grad and not list(layer.parameters(recurse=True))[0].requires_grad


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_fused_lora_on_a_quantized_base_passes_gradcheck_in_float64(method):
    base = QuantLinear.from_linear(nn.Linear(16, 12).double(), method)
    layer = LoRALinear(base, r=3, alpha=6.0, mode="fused")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 4, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, A, B: FusedLoRALinear.apply(x, layer.weight, layer.bias, A, B, layer.scaling),
        (x, layer.lora_A, layer.lora_B))


def test_split_and_fused_lora_on_nf4_give_the_same_output_and_gradients():
    torch.manual_seed(0)
    base = QuantLinear.from_linear(nn.Linear(64, 96), "nf4")
    layer = LoRALinear(base, r=4, alpha=8.0)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(3, 7, 64)
    results = []
    for mode in ("split", "fused"):
        layer.set_mode(mode)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        grads = torch.autograd.grad(y.square().sum(), (xi, layer.lora_A, layer.lora_B))
        results.append((y, *grads))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=64))


def test_quantize_replaces_every_untied_linear_and_keeps_the_head_tied_to_the_embedding():
    model = quantize(tiny_gpt(), "nf4")
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 8 and type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.transformer.wte.weight
    nbytes, n = quantized_bytes(model)
    assert nbytes / n < 0.55


def test_parameter_counts_include_the_quantized_weights():
    from lora import count_parameters
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2))
    counts = count_parameters(model)
    quantize(remove_lora(model), "nf4")
    assert count_parameters(apply_lora(model, LoRAConfig(r=2))) == counts


def test_merge_and_unload_of_lora_on_nf4_is_the_dequantized_weight_plus_the_update():
    model = apply_lora(quantize(tiny_gpt(), "nf4"), LoRAConfig(r=4, targets=("c_attn",)))
    for _, layer in lora_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_(std=0.1)
    expected = {n: layer.weight.dequantize() + layer.delta_weight() for n, layer in lora_layers(model)}
    idx = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        before = model(idx)[0]
        merged = dequantize(merge_and_unload(model))
        after = merged(idx)[0]
    for name, w in expected.items():
        assert torch.equal(merged.get_submodule(name).weight, w)
    assert (after - before).abs().max() < 1e-5


def test_remove_lora_gives_back_the_quantized_layers():
    model = quantize(tiny_gpt(), "int8")
    packed = model.transformer.h[0].attn.c_attn.weight
    remove_lora(apply_lora(model, LoRAConfig(r=2, targets=("c_attn",))))
    assert isinstance(model.transformer.h[0].attn.c_attn, QuantLinear)
    assert model.transformer.h[0].attn.c_attn.weight is packed


# ---- loading ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loading_quantized_tensor_by_tensor_equals_quantizing_the_loaded_model(tmp_path, family):
    torch.manual_seed(0)
    if family == "gpt2":
        model = tiny_gpt()
    else:
        model = LLaMA(LLaMAConfig(vocab_size=128, n_embd=64, intermediate_size=128, n_layer=2, n_head=4,
                                  n_kv_head=2, max_seq_len=32))
    model.save_pretrained(tmp_path)
    streamed = load_quantized(tmp_path, "nf4", verbose=False)
    reference = quantize(type(model).from_pretrained(tmp_path), "nf4")
    assert streamed.state_dict().keys() == reference.state_dict().keys()
    for k, v in reference.state_dict().items():
        assert torch.equal(streamed.state_dict()[k], v), k
    idx = torch.randint(0, 128, (2, 16))
    assert torch.equal(streamed(idx)[0], reference(idx)[0])


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_quantizing_twice_is_refused():
    with pytest.raises(ValueError, match="already quantized"):
        quantize(quantize(tiny_gpt(), "nf4"), "int8")


def test_an_unknown_method_is_named_with_the_choices():
    with pytest.raises(ValueError, match="'nf3' is unknown: use one of nf4, int8"):
        quantize(tiny_gpt(), "nf3")


def test_quantizing_after_lora_is_refused():
    with pytest.raises(ValueError, match="quantize the base first, then apply_lora"):
        quantize(apply_lora(tiny_gpt(), LoRAConfig(r=2)), "nf4")


def test_merging_lora_in_place_on_a_quantized_base_is_refused():
    model = apply_lora(quantize(tiny_gpt(), "nf4"), LoRAConfig(r=2))
    with pytest.raises(RuntimeError, match="merge_and_unload"):
        merge_lora(model)


# ---- QLoRA through train.py ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, hf_gpt2_base):
    """train.py fine-tuning LoRA on the NF4-quantized base (counting by 1) to count by 3; merged on save."""
    from test_train import run_train, write_shards
    from test_train_lora import lora_flags
    tmp = tmp_path_factory.mktemp("qlora")
    write_shards(tmp / "data", stride=3)
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_train(lora_flags(tmp, hf_gpt2_base, quantize="nf4"), monkeypatch)
    return tmp


@pytest.mark.slow
def test_qlora_run_lowers_the_loss_and_checkpoints_only_the_adapter(qlora_run):
    import numpy as np
    import training.checkpoint as checkpoint
    from test_train import read_log
    losses = [r["train_loss"] for r in read_log(qlora_run / "out")]
    assert np.mean(losses[-5:]) < losses[0] - 0.3
    saved = checkpoint.read_checkpoint(qlora_run / "out")
    assert saved["config"]["quantize"] == "nf4" and all(".lora_" in k for k in saved["model"])


@pytest.mark.slow
def test_qlora_adapter_in_peft_on_the_dequantized_base_gives_our_logits(qlora_run, hf_gpt2_base, tmp_path):
    import training.checkpoint as checkpoint
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    dequantize(load_quantized(hf_gpt2_base, "nf4", verbose=False)).save_pretrained(tmp_path / "deq")
    idx = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ours = checkpoint.load_model(qlora_run / "out").eval()(idx)[0]  # re-quantizes the base, as it trained
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "deq")
        theirs = peft.PeftModel.from_pretrained(hf, qlora_run / "out" / "adapter").eval()(idx).logits
        merged = transformers.GPT2LMHeadModel.from_pretrained(qlora_run / "out" / "merged").eval()(idx).logits
    assert (theirs - ours).abs().max() < 1e-4
    assert (merged - ours).abs().max() < 1e-4


@pytest.mark.slow
def test_qlora_run_resumes_with_the_same_losses(tmp_path, monkeypatch, hf_gpt2_base):
    from test_train_lora import whole_and_resumed_losses  # the base is quantized again on resume: the same bytes
    whole, resumed = whole_and_resumed_losses(tmp_path, monkeypatch, hf_gpt2_base, quantize="int8")
    assert resumed == whole


def test_train_refuses_quantize_without_a_lora_base(tmp_path, monkeypatch):
    from test_train import run_train, tiny_flags, write_shards
    write_shards(tmp_path / "data")
    with pytest.raises(ValueError, match="quantize='nf4' with init_from='scratch': quantization freezes a loaded base"):
        run_train(tiny_flags(tmp_path, quantize="nf4"), monkeypatch)
