"""LoRA layers that read the same input, grouped (lora/grouped.py): the same outputs and gradients as the separate
layers, for every kind of layer that may sit in a group, and the same LLaMA / Gemma training step."""
import pytest
import torch
import torch.nn as nn

from lora import LoRAConfig, LoRALinear, apply_lora, lora_disabled, lora_layers, save_adapter, set_lora_grouping
from lora.adalora import SVDLinear
from lora.dora import add_magnitude
from lora.grouped import GroupedLoRA
from model import Gemma, GemmaConfig, LLaMA, LLaMAConfig
from model.modules import project
from quant.quantize import QuantLinear

C, N = 24, 10
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora(out, r=4, alpha=8.0, seed=0, bias=False, **kw):
    """A LoRALinear C -> out with a random (trained-looking) B: B = 0 would hide a wrong dA or dx."""
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(C, out, bias=bias), r=r, alpha=alpha, **kw)
    nn.init.normal_(layer.lora_B, std=0.3)
    return layer


def qkv(**kw):
    """q, k, v with different widths, ranks and scalings (rsLoRA on one)."""
    return [lora(16, r=4, alpha=8.0, seed=1, **kw), lora(8, r=2, alpha=3.0, seed=2, **kw),
            lora(8, r=6, alpha=6.0, seed=3, rslora=True, **kw)]


def run(layers, grouped, x=None, seed=0):
    """Outputs, and the gradients of x and of every trainable parameter, of project(x, layers) with grouping
    on or off; also whether GroupedLoRA ran. The RNG is reseeded first, so dropout draws the same masks."""
    for layer in layers:
        set_lora_grouping(layer, grouped)
        for p in layer.parameters():
            p.grad = None
    x = (torch.randn(2, N // 2, C, generator=torch.Generator().manual_seed(5)) if x is None else x.detach())
    x.requires_grad_(True)
    torch.manual_seed(seed)
    outs = project(x, layers)
    weights = [torch.randn(o.shape, generator=torch.Generator().manual_seed(i)) for i, o in enumerate(outs)]
    sum((o * w).sum() for o, w in zip(outs, weights)).backward()
    ran = any(type(o.grad_fn).__name__ == "GroupedLoRABackward" for o in outs if o.grad_fn is not None)
    grads = [x.grad] + [p.grad for layer in layers for p in layer.parameters() if p.requires_grad]
    return [o.detach() for o in outs], grads, ran


def assert_same(layers, expect_grouped, atol=1e-5):
    ref_out, ref_grads, ran = run(layers, grouped=False)
    assert not ran
    out, grads, ran = run(layers, grouped=True)
    assert ran == expect_grouped
    for a, b in zip(ref_out + ref_grads, out + grads):
        if a is None or b is None:  # a merged layer's A and B get no gradient, grouped or not
            assert a is None and b is None
            continue
        torch.testing.assert_close(b, a, atol=atol, rtol=1e-5)


def test_gradcheck_float64_different_ranks_scalings_and_biases():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    params = []
    for out, r, bias in ((5, 2, True), (3, 1, False), (4, 3, True)):
        params += [torch.randn(out, 6, dtype=torch.float64, requires_grad=True),  # W: its gradient too
                   torch.randn(out, dtype=torch.float64, requires_grad=True) if bias else None,
                   torch.randn(r, 6, dtype=torch.float64, requires_grad=True),
                   torch.randn(out, r, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(lambda x, *p: GroupedLoRA.apply(x, (0.5, 2.0, 1.5), *p), (x, *params))


def test_grouped_equals_separate_layers():
    assert_same(qkv(), expect_grouped=True)


def test_grouped_with_biases_and_trainable_biases():
    layers = qkv(bias=True)
    layers[0].bias.requires_grad_(True)  # e.g. a bias trained alongside; frozen ones get no gradient
    assert_same(layers, expect_grouped=True)
    assert layers[0].bias.grad is not None and layers[1].bias.grad is None


def test_gate_and_up_pair_and_a_single_layer():
    assert_same([lora(32, seed=1), lora(32, seed=2)], expect_grouped=True)
    assert_same([lora(32, seed=1)], expect_grouped=False)


def test_dropout_falls_back_in_training_with_the_same_masks_and_groups_in_eval():
    layers = qkv(dropout=0.3)
    assert_same(layers, expect_grouped=False)  # each layer its own mask, drawn in the same order
    ref = run(layers, grouped=False, seed=1)[0]
    assert not torch.equal(ref[0], run(layers, grouped=False, seed=2)[0][0])  # dropout is really on
    for layer in layers:
        layer.eval()
    assert_same(layers, expect_grouped=True)


def test_one_layer_with_dropout_falls_back_and_the_other_two_group():
    layers = qkv()
    layers[1] = lora(8, r=2, seed=2, dropout=0.5)
    assert_same(layers, expect_grouped=True)
    assert layers[1].lora_A.grad is not None


@pytest.mark.parametrize("which", ["one", "all"])
def test_dora_falls_back(which):
    layers = qkv()
    for layer in layers if which == "all" else layers[1:2]:
        add_magnitude(layer)
    assert_same(layers, expect_grouped=which == "one")


@pytest.mark.parametrize("which", ["one", "all"])
def test_fused_mode_falls_back(which):
    layers = qkv()
    for layer in layers if which == "all" else layers[:1]:
        layer.set_mode("fused")
    assert_same(layers, expect_grouped=which == "one")


def test_plain_linear_among_them():
    """lora_targets=q_proj,v_proj: k_proj is an nn.Linear, run on its own; q and v grouped."""
    layers = qkv()
    torch.manual_seed(7)
    layers[1] = nn.Linear(C, 8, bias=False).requires_grad_(False)
    assert_same(layers, expect_grouped=True)


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantized_bases(method):
    torch.manual_seed(0)
    layers = []
    for i, out in enumerate((16, 8, 8)):
        layer = LoRALinear(QuantLinear.from_linear(nn.Linear(C, out, bias=i == 0), method), r=2 + i, alpha=4.0)
        nn.init.normal_(layer.lora_B, std=0.3)
        layers.append(layer)
    assert_same(layers, expect_grouped=True)


def test_merged_layers_fall_back():
    layers = qkv()
    layers[0].merge()
    assert_same(layers, expect_grouped=True)  # k and v still grouped
    for layer in layers:
        layer.merge()
    assert_same(layers, expect_grouped=False)


def test_disabled_adapters_fall_back():
    """DPO's reference pass switches the adapters off (lora_disabled): the base layers, not grouped."""
    model = nn.ModuleList(qkv())
    x = torch.randn(2, 5, C)
    with lora_disabled(model):
        assert_same(list(model), expect_grouped=False)
        out, _, _ = run(list(model), grouped=True, x=x)
    base = [nn.functional.linear(x, layer.weight) for layer in model]
    for a, b in zip(out, base):
        torch.testing.assert_close(a, b)


def test_a_subclass_with_its_own_forward_and_a_hooked_layer_fall_back():
    torch.manual_seed(0)
    svd = [SVDLinear(nn.Linear(C, 8), r=2, alpha=4.0) for _ in range(2)]
    for layer in svd:
        nn.init.normal_(layer.lora_E, std=0.3)
    assert_same(svd, expect_grouped=False)
    layers, seen = qkv(), []
    layers[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert_same(layers, expect_grouped=True)  # q and k grouped, v on its own so that its hook runs
    assert len(seen) == 2


def test_lora_A_of_another_dtype_falls_back():
    """Under autocast, layers with fp32 and bf16 adapters both run (F.linear casts); one torch.cat of their A's
    would not be what they compute, so none is grouped."""
    layers = qkv()
    layers[2].to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_same(layers, expect_grouped=False, atol=0)


def test_saves_no_more_for_backward_than_the_separate_layers():
    """Grouped, the graph keeps x and x A_cat^T (N, R): the k (N, r_i) tensors the split layers keep, side by side."""
    layers = qkv()
    x = torch.randn(2, N // 2, C, requires_grad=True)
    saved_bytes = []
    for on in (False, True):
        set_lora_grouping(nn.ModuleList(layers), on)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            project(x, layers)
        saved_bytes.append(sum(storages.values()))
    assert saved_bytes[1] <= saved_bytes[0]


def test_cpu_autocast_bf16_close_to_separate():
    layers = qkv()
    x = torch.randn(2, 5, C)
    results = []
    for on in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(run(layers, grouped=on, x=x))
    assert results[1][2] and not results[0][2]
    for a, b in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        assert a.dtype == b.dtype
        torch.testing.assert_close(b.float(), a.float(), atol=3e-2, rtol=3e-2)


# ---- whole models -------------------------------------------------------------------------------------------------

def llama():
    torch.manual_seed(0)
    return LLaMA(LLaMAConfig(vocab_size=101, n_embd=32, intermediate_size=64, n_layer=2, n_head=4, n_kv_head=2,
                             max_seq_len=32))


def gemma():
    torch.manual_seed(0)
    return Gemma(GemmaConfig(vocab_size=101, n_embd=32, intermediate_size=64, n_layer=2, n_head=4, n_kv_head=2,
                             head_dim=8, query_pre_attn_scalar=8, sliding_window=4, max_seq_len=32))


def grouped_nodes(tensor):
    """How many GroupedLoRA calls the autograd graph behind `tensor` holds."""
    seen, todo = set(), [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo += [next_node for next_node, _ in node.next_functions]
    return sum(type(node).__name__ == "GroupedLoRABackward" for node in seen)


def loss_and_grads(model, grouped, checkpointing=False, n_grouped=None):
    """The loss and the trainable parameters' gradients of one step; n_grouped: how many GroupedLoRA calls the
    graph must hold (q/k/v of each block; gate/up run on their own)."""
    set_lora_grouping(model, grouped)
    model.activation_checkpointing = checkpointing
    for p in model.parameters():
        p.grad = None
    idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(2))
    _, loss = model(idx, targets)
    if n_grouped is not None:
        assert grouped_nodes(loss) == n_grouped
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def trained_looking(model, **config):
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=SEVEN, **config))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0.0, 0.2)
    return model


@pytest.mark.parametrize("family", [llama, gemma])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_with_lora_on_all_seven_projections_same_loss_and_gradients(family, checkpointing):
    model = trained_looking(family())
    ref_loss, ref = loss_and_grads(model, grouped=False, checkpointing=checkpointing, n_grouped=0)
    loss, grads = loss_and_grads(model, grouped=True, checkpointing=checkpointing, n_grouped=2)  # 2 blocks
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    assert grads.keys() == ref.keys() and len(grads) == 2 * 7 * 2
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], atol=1e-5, rtol=1e-5, msg=name)


def test_llama_with_two_of_the_three_targets_and_dropout_trains_the_same():
    """lora_targets=q_proj,v_proj (k_proj plain) and dropout 0.1: the step is the same, grouped or not (q and v
    each draw their own mask, so they run on their own in training)."""
    torch.manual_seed(0)
    model = llama()
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=("q_proj", "v_proj", "up_proj"), dropout=0.1))
    results = []
    for on in (False, True):
        torch.manual_seed(3)
        results.append(loss_and_grads(model, grouped=on))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=0)
    for name in results[0][1]:
        torch.testing.assert_close(results[1][1][name], results[0][1][name], atol=1e-6, rtol=1e-6)


def test_adapter_trained_grouped_loads_in_peft_with_identical_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=500.0, initializer_range=0.2, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "base")
    ours = LLaMA.from_pretrained(tmp_path / "base")
    apply_lora(ours, LoRAConfig(r=4, alpha=8, targets=SEVEN))
    set_lora_grouping(ours, True)
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):  # train grouped: B moves away from 0, so the adapter changes the logits
        optimizer.zero_grad()
        ours(idx, idx)[1].backward()
        optimizer.step()
    save_adapter(ours, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ours.eval()
    with torch.no_grad():
        ref = peft_model(idx).logits
        with peft_model.disable_adapter():
            base = peft_model(idx).logits
        got = ours(idx)[0]
    assert (ref - base).abs().max().item() > 1e-3  # the adapter matters
    assert (got - ref).abs().max().item() < 1e-4


def test_bench_shared_input_runs_end_to_end_in_a_tiny_configuration(tmp_path):
    from bench import shared_input
    rows = shared_input.main(["--n_layer", "1", "--B", "1", "--T", "8", "--repeats", "1", "--layer_repeats", "1",
                              "--calls", "1", "--threads", "1", "--out_dir", str(tmp_path)])
    assert [r["what"].split(" ")[0] for r in rows] == ["qkv", "torch.cat", "gate_up", "LoRA"]
    assert all(r["off_ms"] > 0 and r["ratio"] > 0 for r in rows if "ratio" in r)
    assert (tmp_path / "cpu_shared_input.md").exists()
