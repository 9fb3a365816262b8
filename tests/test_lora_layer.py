"""LoRALinear against hand computations: the formula, analytic gradients, gradcheck, and split vs fused."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import FusedLoRALinear, LoRALinear


def make_layer(in_f=6, out_f=5, r=3, alpha=6.0, bias=True, dtype=torch.float64, mode="split", nonzero_B=True,
               **kw):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(in_f, out_f, bias=bias, dtype=dtype), r=r, alpha=alpha, mode=mode, **kw)
    if nonzero_B:  # a fresh B is zero, which would make most checks below vacuous
        with torch.no_grad():
            layer.lora_B.normal_()
    return layer


def test_split_forward_equals_formula():
    layer = make_layer()
    x = torch.randn(4, 6, dtype=torch.float64)
    W, b, A, B = layer.weight, layer.bias, layer.lora_A, layer.lora_B
    expected = x @ W.T + b + (6.0 / 3) * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), expected)


def test_scaling_is_alpha_over_r_or_alpha_over_sqrt_r_with_rslora():
    assert make_layer(r=4, alpha=8.0).scaling == 2.0
    assert make_layer(r=4, alpha=8.0, rslora=True).scaling == 8.0 / math.sqrt(4)


def test_init_A_kaiming_uniform_B_zero():
    layer = make_layer(in_f=100, out_f=7, r=50, nonzero_B=False)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(100)  # kaiming_uniform(a=sqrt(5)) on fan_in=100: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound


def test_fresh_layer_equals_base_linear():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    x = torch.randn(3, 6)
    expected = base(x)
    layer = LoRALinear(base, r=2, alpha=4.0)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


def test_state_dict_keys_keep_base_names():
    assert set(make_layer().state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert set(make_layer(bias=False).state_dict()) == {"weight", "lora_A", "lora_B"}


def test_base_weight_and_bias_are_frozen_and_get_no_grad():
    layer = make_layer()
    layer(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_analytic_grads_of_A_and_B_on_tiny_case():
    # y = x W^T + s (x A^T) B^T with in=2, out=1, r=1 and loss = sum(y): dB = s * sum_n(x_n A^T), dA = s * B^T sum_n x_n
    layer = LoRALinear(nn.Linear(2, 1, bias=False, dtype=torch.float64), r=1, alpha=3.0)  # s = 3
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, -2.0]]))
        layer.lora_B.copy_(torch.tensor([[0.5]]))
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    for mode in ("split", "fused"):
        layer.set_mode(mode)
        layer.lora_A.grad = layer.lora_B.grad = None
        layer(x).sum().backward()
        # x A^T = [1-4, 3-8] = [-3, -5]: dB = 3 * (-8) = -24;  dA = 3 * 0.5 * (x1 + x2) = 1.5 * [4, 6] = [6, 9]
        torch.testing.assert_close(layer.lora_B.grad, torch.tensor([[-24.0]], dtype=torch.float64))
        torch.testing.assert_close(layer.lora_A.grad, torch.tensor([[6.0, 9.0]], dtype=torch.float64))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 6), (2, 3, 6)])
def test_fused_equals_split_outputs_and_grads_float64(bias, shape):
    split, fused = make_layer(bias=bias), make_layer(bias=bias, mode="fused")
    x = torch.randn(*shape, dtype=torch.float64)
    grad_out = torch.randn(*shape[:-1], 5, dtype=torch.float64)
    results = []
    for layer in (split, fused):
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.backward(grad_out)
        results.append((y, xi.grad, layer.lora_A.grad, layer.lora_B.grad))
    for s, f in zip(*results):
        torch.testing.assert_close(f, s, rtol=1e-12, atol=1e-12)


def test_fused_function_passes_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)  # base grad too, to check every path
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: FusedLoRALinear.apply(*t, 1.5), (x, W, b, A, B))
    assert torch.autograd.gradcheck(lambda x, W, A, B: FusedLoRALinear.apply(x, W, None, A, B, 0.7), (x, W, A, B))


def test_fused_saves_only_x_besides_parameters():
    layer = make_layer(mode="fused")
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    params = {p.data_ptr() for p in layer.parameters()}
    assert [t.shape for t in saved if t.data_ptr() not in params] == [x.shape]  # no (out, in) temporary kept


def test_fused_with_dropout_is_a_clear_error():
    with pytest.raises(ValueError, match="fused.*dropout"):
        make_layer(mode="fused", dropout=0.1)
    layer = make_layer(dropout=0.1)
    with pytest.raises(ValueError, match="split"):
        layer.set_mode("fused")


def test_dropout_applies_to_lora_input_only_in_training():
    layer = make_layer(dropout=0.5)
    x = torch.randn(64, 6, dtype=torch.float64)
    dropped = []
    layer.lora_dropout.register_forward_hook(lambda mod, inp, out: dropped.append(out))
    y_train = layer.train()(x)
    x_drop = dropped[0]  # inverted dropout: each entry is 0 or x / (1 - p)
    assert torch.all((x_drop == 0) | torch.isclose(x_drop, 2 * x))
    assert 0.3 < (x_drop == 0).double().mean() < 0.7
    base = F.linear(x, layer.weight, layer.bias)  # the frozen path sees the undropped x
    torch.testing.assert_close(y_train, base + layer.scaling * (x_drop @ layer.lora_A.T) @ layer.lora_B.T)
    y_eval = layer.eval()(x)
    torch.testing.assert_close(y_eval, base + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T)


def test_merge_makes_plain_linear_with_same_output_and_unmerge_restores_weight():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(3, 6)
    y = layer(x)
    W0 = layer.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer.weight, W0 + layer.scaling * layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)  # plain linear
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, W0, rtol=0, atol=1e-6)  # fp32 rounding only
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-6)


def test_disabled_layer_is_the_base_layer():
    layer = make_layer()
    x = torch.randn(3, 6, dtype=torch.float64)
    layer.enabled = False
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def test_wrapping_shares_the_base_parameters_without_copy():
    base = nn.Linear(4, 3)
    layer = LoRALinear(base, r=2, alpha=2.0)
    assert layer.weight is base.weight and layer.bias is base.bias


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=2.5), dict(dropout=1.0), dict(mode="merged")])
def test_bad_arguments_are_named_in_the_error(bad):
    args = dict(r=2, alpha=2.0) | bad
    with pytest.raises(ValueError, match=next(iter(bad)) if "mode" not in bad else "mode"):
        LoRALinear(nn.Linear(4, 3), **args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast bf16 is checked on CUDA only")
def test_fused_matches_split_under_cuda_autocast_bf16():
    split = make_layer(in_f=256, out_f=384, r=8, dtype=torch.float32).cuda()
    fused = make_layer(in_f=256, out_f=384, r=8, dtype=torch.float32, mode="fused").cuda()
    x = torch.randn(4, 32, 256, device="cuda")
    grads = []
    for layer in (split, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        y.float().square().mean().backward()
        assert layer.lora_A.grad.dtype == torch.float32
        grads.append((y.float(), layer.lora_A.grad, layer.lora_B.grad))
    for s, f in zip(*grads):
        torch.testing.assert_close(f, s, rtol=3e-2, atol=3e-2 * s.abs().max().item())


def test_split_under_autocast_returns_low_precision_output_and_fp32_grads():
    # The split path adds the LoRA term in place (addmm_), which autocast does not cast, so the layer casts B
    # itself. CI has no GPU: a layer this small checks the dtype logic with CPU autocast in microseconds
    # (bf16 is only slow on CPU for real sizes). Compared with the formula in fp32.
    layer = make_layer(in_f=16, out_f=8, r=4, dtype=torch.float32)
    x = torch.randn(2, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    W, b, A, B = layer.weight, layer.bias, layer.lora_A, layer.lora_B
    expected = x @ W.T + b + layer.scaling * (x @ A.T) @ B.T
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
