"""AdaLoRA against Hugging Face PEFT: the SVD-form layer and its regulariser, the rank schedule (same importance
fixture -> same masked singular values at every step), and adapters in both directions."""
import warnings

import pytest
import torch

from lora.adalora import (AdaLoRAConfig, RankAllocator, adalora_layers, apply_adalora, load_adalora_adapter,
                          orth_regularization, save_adalora_adapter)
from model import GPT

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 100
IDX = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
SCHEDULE = dict(init_r=4, target_r=2, tinit=2, tfinal=3, deltaT=2, total_step=12)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hf_gpt2")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
                                     eos_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def peft_adalora(base_dir, targets=("c_attn", "c_fc")):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.GPT2LMHeadModel.from_pretrained(base_dir)
        config = peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=list(targets), lora_alpha=8, **SCHEDULE)
        model = peft.get_peft_model(hf, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_E" in n:
                p.normal_()  # as if trained: lambda != 0
    return model


def peft_params(pm):
    """Our parameter name -> PEFT's parameter, for every AdaLoRA tensor."""
    return {n.removeprefix("base_model.model.").replace(".default", ""): p
            for n, p in pm.named_parameters() if "lora_" in n}


def ours_like(base_dir, pm, targets=("c_attn", "c_fc")):
    ours = apply_adalora(GPT.from_pretrained(base_dir), AdaLoRAConfig(targets=targets, alpha=8, **SCHEDULE))
    theirs = peft_params(pm)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.copy_(theirs[n])
    return ours


def test_same_tensors_give_peft_logits_and_regulariser(base_dir):
    pm = peft_adalora(base_dir)
    ours = ours_like(base_dir, pm)
    out = pm(input_ids=IDX, labels=IDX)  # PEFT adds orth_reg_weight * R to the loss
    logits = ours(IDX[:, :-1])[0]  # with targets the model returns no logits (model/chunked_loss.py)
    loss = ours(IDX[:, :-1], IDX[:, 1:])[1]
    torch.testing.assert_close(logits, out.logits[:, :-1], rtol=0, atol=1e-5)
    peft_penalty = out.loss - loss  # PEFT's loss minus the plain next-token loss
    torch.testing.assert_close(0.5 * orth_regularization(ours), peft_penalty, rtol=1e-4, atol=1e-5)


def test_only_the_svd_factors_train(base_dir):
    ours = apply_adalora(GPT.from_pretrained(base_dir), AdaLoRAConfig(**SCHEDULE))
    trainable = sorted({n.rsplit(".", 1)[1] for n, p in ours.named_parameters() if p.requires_grad})
    assert trainable == ["lora_A", "lora_B", "lora_E"]


def test_rank_schedule_masks_what_peft_s_rank_allocator_masks(base_dir):
    """The same gradients (a fixed fixture) every step: the budget, the importance EMAs and so the masked
    singular values agree with PEFT's at every step through init, pruning and final phases."""
    pm = peft_adalora(base_dir)
    ours = ours_like(base_dir, pm)
    allocator = RankAllocator(ours, ours.adalora_config)
    assert (allocator.init_budget, allocator.target_budget) == (pm.base_model.rankallocator.init_bgt,
                                                                pm.base_model.rankallocator.target_bgt)
    theirs, gen = peft_params(pm), torch.Generator().manual_seed(5)
    for step in range(SCHEDULE["total_step"] + 2):
        for n, p in ours.named_parameters():
            if "lora_" in n:
                grad = torch.randn(p.shape, generator=gen)
                p.grad, theirs[n].grad = grad.clone(), grad.clone()
        allocator.update_and_allocate(ours, step)
        pm.base_model.update_and_allocate(step)
        assert allocator.budget_schedule(step) == pm.base_model.rankallocator.budget_schedule(step)
        for n, p in ours.named_parameters():
            if n.endswith("lora_E"):
                assert torch.equal(p == 0, theirs[n] == 0), f"step {step}: {n}"
        pattern = pm.peft_config["default"].rank_pattern
        expected = {k.replace(".default", ""): v for k, v in pattern.items()} if pattern else None
        assert ours.adalora_config.rank_pattern == expected
    kept = sum(sum(v) for v in ours.adalora_config.rank_pattern.values())
    assert kept == SCHEDULE["target_r"] * 4  # 4 adapted layers, target_r on average


def allocated(base_dir):
    """A PEFT AdaLoRA model after a schedule that pruned the ranks unevenly, and ours with the same tensors."""
    pm = peft_adalora(base_dir)
    ours = ours_like(base_dir, pm)
    allocator, gen = RankAllocator(ours, ours.adalora_config), torch.Generator().manual_seed(7)
    theirs = peft_params(pm)
    for step in range(SCHEDULE["total_step"] - SCHEDULE["tfinal"] + 1):
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.grad = torch.randn(p.shape, generator=gen) * (1 + 10 * ("h.1" in n))  # layer 1 matters more
                theirs[n].grad = p.grad.clone()
        allocator.update_and_allocate(ours, step)
        pm.base_model.update_and_allocate(step)
    return pm, ours


def test_peft_adapter_loads_in_ours(base_dir, tmp_path):
    pm, _ = allocated(base_dir)
    pm.save_pretrained(tmp_path)
    ours = load_adalora_adapter(GPT.from_pretrained(base_dir), tmp_path)
    ranks = {n: layer.r for n, layer in adalora_layers(ours)}
    assert len(set(ranks.values())) > 1  # the pattern pruned the layers to different ranks
    with torch.no_grad():
        torch.testing.assert_close(ours(IDX)[0], pm.eval()(input_ids=IDX).logits, rtol=0, atol=1e-5)


def test_our_adapter_loads_in_peft(base_dir, tmp_path):
    pm, ours = allocated(base_dir)
    save_adalora_adapter(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base_dir), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=IDX).logits, ours(IDX)[0], rtol=0, atol=1e-5)
