"""LoRA, DoRA and AdaLoRA on lm_head under the chunked training loss (model/lm.py's head_weight): the same loss and
gradients as the plain path (full logits through the head's own forward, then F.cross_entropy)."""
import warnings

import pytest
import torch

from lora import LoRAConfig, apply_lora, lora_disabled, lora_layers, merge_lora
from lora.adalora import AdaLoRAConfig, apply_adalora
from model import GPT, GPTConfig, LLaMA, LLaMAConfig
from model.lm import head_weight
from quant import QuantLinear, quantize

V = 97
IDX = torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(0))
TARGETS = torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(1))
TARGETS[0, :4] = -1  # ignored targets, and 33 tokens in chunks of 7: a short last chunk
BLOCK_TARGET = {"gpt2": "c_attn", "llama": "q_proj"}


def tiny(family):
    torch.manual_seed(0)
    if family == "gpt2":  # lm_head is wte's tensor
        return GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=32))
    return LLaMA(LLaMAConfig(vocab_size=V, n_embd=32, intermediate_size=64, n_layer=2, n_head=4, n_kv_head=2,
                             max_seq_len=16))


def adapted(family, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2: "lm_head.weight is tied to transformer.wte.weight"
        model = apply_lora(tiny(family), LoRAConfig(**(dict(r=4, alpha=8.0, targets=(BLOCK_TARGET[family],
                                                                                          "lm_head")) | config)))
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: B != 0, m != ||W + s B A||
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.2)
            if layer.lora_magnitude_vector is not None:
                layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand_like(layer.lora_magnitude_vector))
    return model


def loss_and_grads(model, chunk_size, recompute=True):
    """The training loss and the gradient of every trainable parameter, on the given loss path."""
    model.loss_chunk_size, model.loss_recompute = chunk_size, recompute
    model.zero_grad(set_to_none=True)
    _, loss = model(IDX, TARGETS)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_loss_and_grads(model, recompute):
    ref_loss, ref = loss_and_grads(model, 0)  # the plain path: independent of head_weight and the chunked loss
    loss, grads = loss_and_grads(model, 7, recompute)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref.keys()
    for name, g in ref.items():
        assert g.abs().max() > 0, name  # every trainable tensor gets a gradient on the plain path...
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5 * g.abs().max().item(), msg=name)  # ...and here


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "grads_in_forward"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_chunked_loss_with_lora_on_lm_head_equals_the_plain_loss_and_its_gradients(family, recompute):
    model = adapted(family).train()
    head = model.lm_head
    if family == "gpt2":
        assert head.weight_is_tied and head.weight is model.transformer.wte.weight
    assert any(n.startswith("lm_head.lora_") for n, p in model.named_parameters() if p.requires_grad)
    assert_same_loss_and_grads(model, recompute)
    with torch.no_grad():
        loss = model(IDX, TARGETS)[1]
        model.lm_head.enabled = False  # the head's adapter changes the loss: one that ignored it would equal this
        assert (model(IDX, TARGETS)[1] - loss).abs() > 1e-3


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "grads_in_forward"])
def test_a_tied_embedding_that_trains_gets_both_of_its_gradients_through_a_lora_head(recompute):
    """GPT-2 with LoRA on lm_head and wte in modules_to_save: wte's tensor is the head's W, which now trains. Its
    gradient sums the embedding lookup's and the head's, dW' flowing through W' = W + s B A on the chunked path."""
    model = adapted("gpt2", modules_to_save=("wte",)).train()
    assert model.lm_head.weight.requires_grad
    assert_same_loss_and_grads(model, recompute)


@pytest.mark.parametrize("mode", ["split", "fused"])
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "grads_in_forward"])
def test_chunked_loss_with_dora_on_lm_head_equals_the_plain_loss_and_its_gradients(recompute, mode):
    model = adapted("llama", use_dora=True, mode=mode).train()  # LLaMA's untied head (DoRA refuses a tied one)
    assert model.lm_head.lora_magnitude_vector is not None
    assert_same_loss_and_grads(model, recompute)


def test_lora_dropout_on_the_head_takes_the_plain_path_in_training_and_the_weight_in_eval():
    """Dropout reaches the adapter's input only: no single W' gives a training forward. head_weight says None and
    the loss is the plain path's, dropout mask and all (the same RNG draws); in eval dropout is off, W' serves."""
    model = adapted("llama", dropout=0.3).train()
    assert head_weight(model.lm_head) is None
    torch.manual_seed(5)
    ref_loss, ref = loss_and_grads(model, 0)
    torch.manual_seed(5)
    loss, grads = loss_and_grads(model, 7)
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[n], g) for n, g in ref.items())
    model.eval()
    assert head_weight(model.lm_head) is not None
    assert_same_loss_and_grads(model, recompute=True)  # eval: dropout off, both paths deterministic


def test_a_merged_or_disabled_lora_head_gives_the_weight_it_computes_with():
    model = adapted("llama").eval()
    with torch.no_grad():
        _, adapted_loss = model(IDX, TARGETS)
        with lora_disabled(model):
            _, base_loss = model(IDX, TARGETS)
            assert torch.equal(head_weight(model.lm_head), model.lm_head.weight)
            model.loss_chunk_size = 0
            torch.testing.assert_close(model(IDX, TARGETS)[1], base_loss, rtol=1e-6, atol=1e-6)
            model.loss_chunk_size = 7
        merge_lora(model)
        torch.testing.assert_close(model(IDX, TARGETS)[1], adapted_loss, rtol=1e-6, atol=1e-6)
    assert (adapted_loss - base_loss).abs() > 1e-3


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "grads_in_forward"])
def test_chunked_loss_with_adalora_on_lm_head_equals_the_plain_loss(recompute):
    """AdaLoRA's SVDLinear subclasses LoRALinear: its head weight comes from its own delta_weight (lambda, scaling)."""
    model = apply_adalora(tiny("llama"), AdaLoRAConfig(init_r=4, target_r=2, targets=("q_proj", "lm_head"),
                                                       total_step=10))
    torch.manual_seed(2)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_E.normal_()
    for _, layer in lora_layers(model):
        for p in (layer.lora_A, layer.lora_B, layer.lora_E):
            p.requires_grad_(True)
    assert_same_loss_and_grads(model.train(), recompute)


@pytest.mark.parametrize("with_lora", [False, True])
def test_a_quantized_head_gives_its_dequantized_weight_to_the_chunked_loss(with_lora):
    model = quantize(tiny("llama"), "nf4", skip=())  # the untied head quantized too
    assert isinstance(model.lm_head, QuantLinear)
    if with_lora:
        model = apply_lora(model, LoRAConfig(r=4, targets=("q_proj", "lm_head")))
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.normal_(std=0.2)
        assert_same_loss_and_grads(model.train(), recompute=True)
    else:
        with torch.no_grad():
            model.loss_chunk_size = 0
            ref = model(IDX, TARGETS)[1]
            model.loss_chunk_size = 7
            torch.testing.assert_close(model(IDX, TARGETS)[1], ref, rtol=1e-6, atol=1e-6)
