"""Memory at the limit: the chunked linear + cross-entropy against F.cross_entropy on the full logits, activation
checkpointing against the plain forward, and the memory model's activation count against what autograd saves."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lora import LoRAConfig, apply_lora
from model import GPT, LLaMA, GPTConfig, LLaMAConfig
from model.chunked_loss import linear_cross_entropy
from training.memory import estimate_peak_bytes, glibc

N, C, V = 45, 16, 97  # 45 tokens: chunk sizes 1, 15 and 45 divide it, 7 and 64 do not


def hidden_weight_targets(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, requires_grad=True)
    weight = (0.5 * torch.randn(V, C, generator=g)).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::4] = -1  # ignored tokens, as the SFT prompts and padding are
    return x, weight, targets


@pytest.mark.parametrize("chunk_size", [1, 7, 15, 45, 64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("recompute", [True, False])
def test_chunked_loss_and_gradients_equal_cross_entropy_on_full_logits(chunk_size, reduction, recompute):
    x, weight, targets = hidden_weight_targets()
    expected = F.cross_entropy(x @ weight.t(), targets, ignore_index=-1, reduction=reduction)
    expected_dx, expected_dw = torch.autograd.grad(2.5 * expected, (x, weight))  # an upstream gradient of 2.5
    loss = linear_cross_entropy(x, weight, targets, chunk_size=chunk_size, reduction=reduction, recompute=recompute)
    dx, dw = torch.autograd.grad(2.5 * loss, (x, weight))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, expected_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, expected_dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recompute", [True, False])
def test_frozen_head_gets_no_gradient_and_hidden_states_still_do(recompute):
    x, weight, targets = hidden_weight_targets()
    weight.requires_grad_(False)
    linear_cross_entropy(x, weight, targets, chunk_size=7, recompute=recompute).backward()
    expected_dx, = torch.autograd.grad(F.cross_entropy(x @ weight.t(), targets, ignore_index=-1), (x,))
    assert weight.grad is None
    torch.testing.assert_close(x.grad, expected_dx, rtol=1e-5, atol=1e-5)


def test_all_targets_ignored_gives_nan_mean_and_zero_sum_as_cross_entropy():
    x, weight, _ = hidden_weight_targets()
    targets = torch.full((N,), -1)
    assert torch.isnan(linear_cross_entropy(x, weight, targets))
    assert torch.isnan(F.cross_entropy(x @ weight.t(), targets, ignore_index=-1))
    assert linear_cross_entropy(x, weight, targets, reduction="sum").item() == 0.0


def tiny(family, vocab_size=101, dropout=0.0):
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT(GPTConfig(block_size=32, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, dropout=dropout))
    return LLaMA(LLaMAConfig(vocab_size=vocab_size, n_embd=32, intermediate_size=64, n_layer=2, n_head=4, n_kv_head=2,
                             max_seq_len=32, dropout=dropout))


def batch(vocab_size=101, B=3, T=15):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, vocab_size, (B, T), generator=g)
    targets = torch.randint(0, vocab_size, (B, T), generator=g)
    targets[:, :4] = -1  # a masked prompt
    return idx, targets


def loss_and_grads(model, idx, targets):
    model.zero_grad(set_to_none=True)
    _, loss = model(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("recompute", [True, False])
def test_model_training_loss_and_gradients_equal_cross_entropy_on_its_logits(family, recompute):
    model, (idx, targets) = tiny(family), batch()  # 3 x 15 = 45 tokens
    model.loss_recompute = recompute
    logits, _ = model(idx)  # (B, T, V): the path evaluation and generation use
    expected = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
    expected.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for chunk_size in (15, 8):  # divides the 45 tokens; does not
        model.loss_chunk_size = chunk_size
        logits, loss = model(idx, targets)
        assert logits is None  # training never forms the logits
        model.zero_grad(set_to_none=True)
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
        for n, p in model.named_parameters():  # the head (tied to the embedding in GPT-2) included
            torch.testing.assert_close(p.grad, expected_grads[n], rtol=1e-5, atol=1e-5, msg=n)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_step_never_materialises_the_full_logits(family):
    vocab = 2048  # large: the next largest tensor is the head's (V, C) gradient, N / C = 4 times smaller than N x V
    model, (idx, targets) = tiny(family, vocab_size=vocab), batch(vocab, B=4, T=32)  # N = 128 tokens
    model.loss_chunk_size = 16
    with LargestTensor() as probe:
        _, loss = model(idx, targets)
        loss.backward()
    assert probe.largest == vocab * 32  # dW (V, C); a chunk of logits is (16, V)
    model.loss_chunk_size = 0  # the plain path: the probe sees the (N, V) logits
    with LargestTensor() as probe:
        _, loss = model(idx, targets)
        loss.backward()
    assert probe.largest == 128 * vocab


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("lora", [False, True])
def test_activation_checkpointing_gives_the_same_loss_and_gradients_with_dropout(family, lora):
    model, (idx, targets) = tiny(family, dropout=0.2), batch(B=2, T=8)
    if lora:  # the frozen base: the block's input does not require grad, LoRA's parameters still need theirs
        targets_ = ("c_attn", "c_fc") if family == "gpt2" else ("q_proj", "down_proj")
        apply_lora(model, LoRAConfig(r=4, targets=targets_, dropout=0.1))
    results = []
    for ckpt in (False, True):
        model.activation_checkpointing = ckpt
        torch.manual_seed(123)  # the same dropout masks; checkpointing must replay them in its recompute
        results.append(loss_and_grads(model, idx, targets))
    (loss, grads), (ckpt_loss, ckpt_grads) = results
    torch.manual_seed(124)
    assert not torch.equal(loss_and_grads(model, idx, targets)[0], loss)  # dropout does change the loss
    torch.testing.assert_close(ckpt_loss, loss, rtol=1e-6, atol=1e-6)
    assert ckpt_grads.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(ckpt_grads[n], grads[n], rtol=1e-6, atol=1e-6, msg=n)


def saved_activation_bytes(model, idx, targets):
    """Bytes of the tensors autograd keeps for backward, parameters left out: an independent count."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, targets)
    return sum(kept.values())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("ckpt", [False, True])
def test_memory_model_counts_the_activations_autograd_saves(family, lora, ckpt):
    model = tiny(family, vocab_size=256)
    if lora:
        apply_lora(model, LoRAConfig(r=4, targets=("c_attn", "c_proj") if family == "gpt2" else ("q_proj", "v_proj")))
    model.activation_checkpointing = ckpt
    B, T = 4, 32
    idx, targets = batch(256, B, T)
    predicted = estimate_peak_bytes(model, B, T).activations
    # left out by the model: (B, T) statistics (norms, attention) and the int64 token ids, ~1/C of the rest
    assert saved_activation_bytes(model, idx, targets) == pytest.approx(predicted, rel=0.08)


def test_train_with_checkpointing_and_chunked_loss_follows_the_plain_run_and_reports_memory(tmp_path, monkeypatch,
                                                                                            capsys):
    from test_train import read_log, run_train, tiny_flags, write_shards
    write_shards(tmp_path / "data")
    losses = []
    for i, memory_flags in enumerate([dict(loss_chunk_size=0), dict(loss_chunk_size=7, activation_checkpointing=True)]):
        run_train(tiny_flags(tmp_path, out_dir=tmp_path / f"out{i}", max_steps=3, eval_interval=0, dropout=0.1,
                             **memory_flags), monkeypatch)
        losses.append([r["train_loss"] for r in read_log(tmp_path / f"out{i}")])
    out = capsys.readouterr().out
    assert out.count("memory model, peak of a training step:") == 2
    assert out.count("peak memory measured:") == 2
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


@pytest.mark.parametrize("recompute", [True, False])
def test_under_bf16_autocast_the_matmuls_run_in_bf16_and_the_head_gradient_stays_float32(recompute):
    x, weight, targets = hidden_weight_targets()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, weight, targets, chunk_size=7, recompute=recompute)
        expected = F.cross_entropy((x @ weight.t()).float(), targets, ignore_index=-1)  # what lm_head + the loss do
    loss.backward()
    dw = weight.grad.clone()
    expected_dx, expected_dw = torch.autograd.grad(expected, (x, weight))
    assert loss.dtype == torch.float32 and dw.dtype == torch.float32 and x.grad.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)  # bf16 logits: ~3 significant digits
    torch.testing.assert_close(x.grad, expected_dx, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(dw, expected_dw, rtol=2e-2, atol=2e-3)


ALLOCATOR_PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
from training.memory import set_cpu_mmap_threshold
def rss():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
if {fixed}:
    assert set_cpu_mmap_threshold()
first = torch.ones(2 ** 21)  # 8 MiB, mmapped (above glibc's first threshold, 128 KiB); freeing it raises that threshold
del first
before = rss()
blocks = [torch.ones(2 ** 21) for _ in range(24)]  # 24 x 8 MiB = 192 MiB, touched
keep = torch.ones(2 ** 18)  # 1 MiB allocated after them and kept, as a step keeps later tensors
del blocks
print((rss() - before) / 2 ** 20)
"""


@pytest.mark.slow  # starts processes
@pytest.mark.skipif(not sys.platform.startswith("linux") or glibc() is None, reason="glibc's malloc and /proc only")
@pytest.mark.parametrize("fixed", [False, True])
def test_with_a_fixed_mmap_threshold_freed_activations_leave_the_process(fixed):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE.format(root=root, fixed=fixed)],
                         capture_output=True, text=True, check=True).stdout
    retained_mib = float(out.strip().splitlines()[-1])
    if fixed:
        assert retained_mib < 16  # every 8 MiB block was its own mmap, unmapped on free
    else:
        assert retained_mib > 150  # glibc's moving threshold served them from its heap and keeps it

