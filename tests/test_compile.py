"""torch.compile and bf16 autocast on CPU: the paths a CUDA run takes, proven without a GPU.

Inductor compiles C++ kernels with gcc here, which takes a while on 2 cores: tiny models, a few steps, and the
compiled tests marked slow. Eager PyTorch is the reference throughout.
"""
import copy

import pytest
import torch
from torch._dynamo.utils import counters

import training.checkpoint as checkpoint
from lora import LoRAConfig, apply_lora, lora_layers
from model import GPT, GPTConfig, LLaMA, LLaMAConfig
from test_train import read_log, run_torchrun, run_train, tiny_flags, write_shards
from training.optim import configure_adamw

VOCAB = 96


def tiny_lora_model(family):
    """Layer 0's attention adapted by the split path, layer 1's by the fused path, and the MLPs trained fully
    (modules_to_save): full, split and fused training in one model."""
    torch.manual_seed(0)
    if family == "gpt":
        model = GPT(GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32))
        targets, fused = ("c_attn",), "transformer.h.1.attn.c_attn"
    else:
        model = LLaMA(LLaMAConfig(vocab_size=VOCAB, n_embd=32, intermediate_size=64, n_layer=2, n_head=4,
                                  n_kv_head=2, max_seq_len=16))
        targets, fused = ("q_proj", "v_proj"), "model.layers.1.self_attn.q_proj"
    apply_lora(model, LoRAConfig(r=4, targets=targets, modules_to_save=("mlp",)))
    model.get_submodule(fused).set_mode("fused")
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0.0, 0.1)  # B = 0 would leave A without a gradient at the first step
    return model


def batches(n, B=2, T=16):
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, VOCAB, (B, T + 1), generator=g) for _ in range(n)]


def train_losses(model, raw, steps):
    optimizer = configure_adamw(raw, 0.1, 1e-2, (0.9, 0.95), "cpu", verbose=False)
    losses = []
    for seq in steps:
        _, loss = model(seq[:, :-1], seq[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_compiled_training_gives_the_eager_losses_for_full_split_and_fused_layers(family):
    eager = tiny_lora_model(family)
    raw = copy.deepcopy(eager)
    steps = batches(3)
    expected = train_losses(eager, eager, steps)
    got = train_losses(torch.compile(raw), raw, steps)
    assert len(set(expected)) == 3  # the steps changed the model, so later losses test the compiled backward too
    assert got == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_compiled_run_checkpoints_plain_keys_and_evaluates_samples_and_scores_without_recompiling(tmp_path,
                                                                                                  monkeypatch):
    import evals.hellaswag as eval_hellaswag
    from test_hellaswag import EXAMPLES, write_jsonl
    write_shards(tmp_path / "data")
    jsonl = write_jsonl(tmp_path / "hellaswag_val.jsonl", EXAMPLES)
    monkeypatch.setattr(eval_hellaswag, "download", lambda split, data_dir, **kw: jsonl)  # no network
    torch._dynamo.reset()
    counters.clear()
    # GPT-2's vocabulary, so that samples and HellaSwag (rows of many lengths) run too
    run_train(tiny_flags(tmp_path, compile=True, vocab_size=50304, block_size=64, total_batch_size=4 * 64 * 2,
                         max_steps=3, eval_interval=2, hellaswag_every=2, sample_interval=2, sample_tokens=8),
              monkeypatch)
    # one graph for training and one for evaluation (eval mode, no grad); HellaSwag's and sampling's shapes
    # (run on the uncompiled module) add none
    assert counters["stats"]["unique_graphs"] == 2
    assert [r["step"] for r in read_log(tmp_path / "out") if "hellaswag_acc_norm" in r] == [0, 2]
    saved = checkpoint.read_checkpoint(tmp_path / "out")
    assert not [k for k in saved["model"] if "_orig_mod" in k]
    model = checkpoint.load_model(tmp_path / "out")  # a strict load into a plain, uncompiled GPT
    assert type(model) is GPT


@pytest.mark.slow
def test_two_process_ddp_with_compile_matches_one_compiled_process(tmp_path, monkeypatch):
    write_shards(tmp_path / "data", n_train=10_000)
    flags = dict(compile=True, total_batch_size=4 * 16 * 4, max_steps=3, eval_interval=0)
    run_train(tiny_flags(tmp_path, out_dir=tmp_path / "single", **flags), monkeypatch)
    result = run_torchrun(tiny_flags(tmp_path, out_dir=tmp_path / "ddp", **flags))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    single, ddp = read_log(tmp_path / "single"), read_log(tmp_path / "ddp")
    assert [r["train_loss"] for r in ddp] == pytest.approx([r["train_loss"] for r in single], rel=1e-5)
    assert [r["grad_norm"] for r in ddp] == pytest.approx([r["grad_norm"] for r in single], rel=1e-4)


# ---- bf16 autocast ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_bf16_autocast_keeps_fp32_weights_and_grads_and_a_loss_close_to_fp32(family):
    fp32, bf16 = tiny_lora_model(family), tiny_lora_model(family)
    seq = batches(1)[0]
    _, loss32 = fp32(seq[:, :-1], seq[:, 1:])
    loss32.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss16 = bf16(seq[:, :-1], seq[:, 1:])
        with torch.no_grad():
            logits, _ = bf16(seq[:, :-1])  # with targets the model returns no logits
    loss16.backward()
    configure_adamw(bf16, 0.1, 1e-2, (0.9, 0.95), "cpu", verbose=False).step()
    assert logits.dtype == torch.bfloat16  # autocast did run the matmuls in bf16
    assert loss16.dtype == torch.float32 and loss16.item() == pytest.approx(loss32.item(), rel=1e-2)
    grads32 = {n: p.grad for n, p in fp32.named_parameters() if p.requires_grad}
    for name, p in bf16.named_parameters():
        assert p.dtype == torch.float32, name  # master weights stay fp32, also after the optimizer step
        if p.requires_grad:
            assert p.grad.dtype == torch.float32, name
            cosine = torch.nn.functional.cosine_similarity(p.grad.flatten(), grads32[name].flatten(), dim=0)
            assert cosine > 0.99, name
