"""objective='dpo': the loss against ln 2 and against transformers + PEFT, the three references against each other,
and train.py runs (metrics, resume, DDP)."""
import copy
import json
import math

import numpy as np
import pytest
import torch

import objectives.dpo as dpo
from loaders.dpo import DPOLoader, precompute_reference, reference_path
from lora import LoRAConfig, apply_lora, lora_disabled, remove_lora, save_adapter
from model import GPT
from prepare_sft import HEADER, write_split
from test_train import read_log, run_torchrun, run_train, run_until_the_first_checkpoint, tiny_flags

VOCAB = 128


def make_pairs(n, seed):
    """[(chosen (ids, mask), rejected (ids, mask))]: one random prompt of 3-8 tokens, chosen answers drawn from
    tokens {5, 6}, rejected ones from {7, 8}, of 1-6 tokens each (a preference a small model can learn)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        prompt = rng.integers(10, VOCAB, int(rng.integers(3, 9))).tolist()
        pair = []
        for low in (5, 7):
            answer = rng.integers(low, low + 2, int(rng.integers(1, 7))).tolist()
            pair.append((prompt + answer, [0] * len(prompt) + [1] * len(answer)))
        pairs.append(pair)
    return pairs


def write_dpo_dir(folder, train, val):
    """A preference folder as prepare_sft.py writes it: chosen and rejected as consecutive examples."""
    folder.mkdir(parents=True)
    for split, pairs in (("train", train), ("val", val)):
        write_split(folder, split, [ex for pair in pairs for ex in pair], np.uint16, shard_size=10_000, group=2)
    (folder / HEADER).write_text(json.dumps({"kind": "preference", "tokenizer": "gpt2", "eos_id": 0, "pad_id": 0,
                                             "vocab_size": VOCAB}))
    return folder


def tiny_lora_gpt(b_scale=0.0):
    """A tiny GPT with LoRA on c_attn and c_fc; b_scale > 0 gives lora_B random values (policy != reference)."""
    torch.manual_seed(0)
    model = GPT(GPT.scratch_config(dict(block_size=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32,
                                        dropout=0.0, bias=True)))
    apply_lora(model, LoRAConfig(r=4, alpha=8, targets=("c_attn", "c_fc")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, b_scale) if b_scale else p.zero_()
    return model


def a_batch(tmp_path, n=4):
    loader = DPOLoader(write_dpo_dir(tmp_path / "data", make_pairs(n, 0), make_pairs(n, 1)), n, 31, split="val")
    return loader, next(loader.eval_batches())


def test_step_0_with_a_fresh_adapter_gives_sigmoid_loss_ln_2_and_a_nonzero_lora_B_gradient(tmp_path):
    model = tiny_lora_gpt()  # B = 0: the policy is the reference
    _, (x, y, _) = a_batch(tmp_path)
    logps = dpo.sequence_logps(model(x)[0], y)
    losses, _, _ = dpo.dpo_loss(logps, dpo.reference_logps(x, y, "adapter_off", model), beta=0.1)
    losses.mean().backward()
    assert losses.mean().item() == pytest.approx(math.log(2), abs=1e-7)
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_each_loss_at_a_zero_margin_has_its_closed_form_value():
    zeros = torch.zeros(6)  # 3 pairs, policy == reference: the margin h is 0
    beta = 0.25
    assert dpo.dpo_loss(zeros, zeros, beta, "ipo")[0].tolist() == pytest.approx([1 / (2 * beta) ** 2] * 3)  # (0 - 1/2b)^2
    assert dpo.dpo_loss(zeros, zeros, beta, "hinge")[0].tolist() == [1.0] * 3  # max(0, 1 - 0)
    smoothed = dpo.dpo_loss(zeros, zeros, beta, "sigmoid", label_smoothing=0.3)[0]
    assert smoothed.tolist() == pytest.approx([math.log(2)] * 3)  # either label of a coin flip costs ln 2
    # one pair whose chosen answer gained 2 nats on the reference: -log sigmoid(beta * 2), smoothed toward its flip
    gained = dpo.dpo_loss(torch.tensor([2.0, 0.0]), torch.zeros(2), beta, "sigmoid", label_smoothing=0.1)[0]
    expected = 0.9 * math.log(1 + math.exp(-2 * beta)) + 0.1 * math.log(1 + math.exp(2 * beta))
    assert gained.item() == pytest.approx(expected)


def hf_sequence_logps(logits, labels):
    """log p(answer) as one would write it with Hugging Face outputs: log_softmax, gather, mask, sum."""
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (N, T-1, V)
    targets = labels[:, 1:]  # (N, T-1)
    mask = targets != -100
    picked = torch.gather(logps, 2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T-1)
    return (picked * mask).sum(-1)


def test_logps_and_loss_equal_transformers_gpt2_with_peft_lora_as_policy_and_the_base_as_reference(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    ours = tiny_lora_gpt(b_scale=0.3)
    base = remove_lora(copy.deepcopy(ours))
    base.save_pretrained(tmp_path / "base")
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    hf = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                                        tmp_path / "adapter").eval()
    _, (x, y, _) = a_batch(tmp_path)
    ids = torch.cat([x, x[:, -1:]], dim=1)  # (N, T+1): the inputs, and any last token (its label decides)
    labels = torch.cat([torch.full_like(y[:, :1], -100), y.masked_fill(y == -1, -100)], dim=1)  # aligned with ids
    ids = torch.where(labels == -100, ids, labels)  # the answer tokens sit where their labels say
    attention = torch.ones_like(ids)
    with torch.no_grad():
        hf_policy = hf_sequence_logps(hf(ids, attention_mask=attention).logits, labels)
        with hf.disable_adapter():
            hf_ref = hf_sequence_logps(hf(ids, attention_mask=attention).logits, labels)
        our_policy = dpo.sequence_logps(ours(x)[0], y)
        our_ref = dpo.reference_logps(x, y, "adapter_off", ours)
    B = len(x) // 2
    h = (hf_policy[:B] - hf_ref[:B]) - (hf_policy[B:] - hf_ref[B:])
    hf_loss = -torch.nn.functional.logsigmoid(0.1 * h).mean()  # the DPO paper's loss, written out
    assert our_policy.tolist() == pytest.approx(hf_policy.tolist(), abs=1e-5)
    assert our_ref.tolist() == pytest.approx(hf_ref.tolist(), abs=1e-5)
    assert not torch.allclose(hf_policy, hf_ref)  # the adapter does change the log-probs
    assert dpo.dpo_loss(our_policy, our_ref, beta=0.1)[0].mean().item() == pytest.approx(hf_loss.item(), abs=1e-5)


def loss_and_grads(model, x, y, ref):
    model.zero_grad()
    losses, _, _ = dpo.dpo_loss(dpo.sequence_logps(model(x)[0], y), ref, beta=0.1)
    losses.mean().backward()
    return losses.mean().item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_adapter_off_copy_and_precompute_give_the_same_loss_and_gradients(tmp_path):
    model = tiny_lora_gpt(b_scale=0.3)
    loader, (x, y, _) = a_batch(tmp_path)
    frozen_base = remove_lora(copy.deepcopy(model)).requires_grad_(False)  # what 'copy' holds: the starting model
    precompute_reference([loader], lambda x, y: dpo.reference_logps(x, y, "adapter_off", model),
                         tmp_path / "ref.npz", "cpu")
    _, _, stored = next(loader.eval_batches())
    results = [loss_and_grads(model, x, y, dpo.reference_logps(x, y, kind, model, frozen_base, stored))
               for kind in ("adapter_off", "copy", "precompute")]
    (loss, grads), others = results[0], results[1:]
    assert loss > 0 and loss != pytest.approx(math.log(2))  # policy != reference: not the trivial step 0
    for other_loss, other_grads in others:
        assert other_loss == loss
        assert grads.keys() == other_grads.keys()
        assert all(torch.equal(grads[n], other_grads[n]) for n in grads)


def test_a_pair_stays_together_in_a_micro_batch_chosen_rows_first(tmp_path):
    pairs = make_pairs(6, 7)
    loader = DPOLoader(write_dpo_dir(tmp_path / "data", pairs, pairs), 2, 31, process_rank=1, num_processes=2)
    x, y, _ = loader.next_batch()  # rank 1's 2 pairs of the first 4 of the epoch
    order = np.random.default_rng([1337, 0]).permutation(6)[2:4]
    for row, i in enumerate(order):
        for half, (ids, _) in enumerate(pairs[i]):
            assert x[row + 2 * half, :len(ids) - 1].tolist() == ids[:-1]


LORA = dict(peft_method="lora", lora_r=4, lora_alpha=8.0, lora_targets=("c_attn", "c_fc", "q_proj", "v_proj", "up_proj"))


def dpo_flags(tmp_path, peft_method="lora", **overrides):
    flags = dict(objective="dpo", block_size=32, batch_size=2, total_batch_size=2 * 32 * 2, max_steps=4,
                 eval_interval=2, eval_iters=0, max_lr=3e-2, warmup_steps=0, dpo_beta=0.5,
                 **(LORA if peft_method == "lora" else dict(peft_method=peft_method)))
    flags.update(overrides)
    return tiny_flags(tmp_path, **flags)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_a_lora_run_logs_trl_metrics_starts_at_ln_2_and_learns_the_preference(tmp_path, monkeypatch, model_type):
    write_dpo_dir(tmp_path / "data", make_pairs(32, 2), make_pairs(8, 3))
    run_train(dpo_flags(tmp_path, model_type=model_type, max_steps=12, eval_interval=11), monkeypatch)
    log = read_log(tmp_path / "out")
    names = dpo.METRICS[1:]
    assert all(all(name in r for name in names) for r in log)  # every step
    assert [r["step"] for r in log if "eval_rewards/accuracies" in r] == [0, 11]
    first, last = log[0], log[-1]
    assert first["train_loss"] == pytest.approx(math.log(2), abs=1e-6) and first["loss"] == first["train_loss"]
    assert first["eval_rewards/accuracies"] == 0.5 and first["eval_rewards/margins"] == 0
    assert last["eval_rewards/accuracies"] > 0.8 and last["eval_rewards/margins"] > 0


def test_a_full_fine_tune_with_precomputed_reference_resumes_without_recomputing_it(tmp_path, monkeypatch):
    write_dpo_dir(tmp_path / "data", make_pairs(16, 4), make_pairs(4, 5))
    flags = dict(peft_method="full", dpo_reference="precompute", max_steps=6, eval_interval=0, max_lr=1e-3)
    run_train(dpo_flags(tmp_path, out_dir=tmp_path / "whole", **flags), monkeypatch)
    run_until_the_first_checkpoint(dpo_flags(tmp_path, out_dir=tmp_path / "split", checkpoint_interval=3, **flags),
                                   monkeypatch)
    stored = list((tmp_path / "data").glob("reference_logps_*.npz"))
    assert len(stored) == 1  # both runs start from the same model: one file
    before = stored[0].stat().st_mtime_ns
    run_train(dpo_flags(tmp_path, out_dir=tmp_path / "split", init_from="resume", **flags), monkeypatch)
    assert stored[0].stat().st_mtime_ns == before
    whole, split = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert [r["train_loss"] for r in split] == [r["train_loss"] for r in whole]
    assert [r["rewards/margins"] for r in split] == [r["rewards/margins"] for r in whole]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_twice_the_accumulation(tmp_path, monkeypatch):
    write_dpo_dir(tmp_path / "data", make_pairs(24, 6), make_pairs(6, 7))
    flags = dict(total_batch_size=2 * 32 * 4, max_steps=3)  # 4 micro-steps of 2 pairs; 2 per rank under DDP
    run_train(dpo_flags(tmp_path, out_dir=tmp_path / "single", **flags), monkeypatch)
    result = run_torchrun(dpo_flags(tmp_path, out_dir=tmp_path / "ddp", **flags))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    single, ddp = read_log(tmp_path / "single"), read_log(tmp_path / "ddp")
    for key in ("train_loss", "grad_norm", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "eval_rewards/margins", "eval_logps/rejected"):
        assert [r[key] for r in ddp if key in r] == pytest.approx([r[key] for r in single if key in r], rel=1e-4), key


def test_full_fine_tunes_with_a_frozen_copy_and_with_precomputed_log_probs_take_the_same_steps(tmp_path, monkeypatch):
    write_dpo_dir(tmp_path / "data", make_pairs(16, 8), make_pairs(4, 9))
    for reference in ("copy", "precompute"):
        run_train(dpo_flags(tmp_path, out_dir=tmp_path / reference, peft_method="full", dpo_reference=reference, max_lr=1e-3),
                  monkeypatch)
    copy_log, precompute_log = read_log(tmp_path / "copy"), read_log(tmp_path / "precompute")
    for key in ("train_loss", "grad_norm", "rewards/margins", "eval_rewards/margins"):
        assert [r[key] for r in copy_log if key in r] == pytest.approx([r[key] for r in precompute_log if key in r],
                                                                       abs=1e-6), key
    assert copy_log[-1]["rewards/margins"] != 0  # the policy moved away from its reference


def test_adapter_off_without_lora_is_refused_in_one_line(tmp_path, monkeypatch):
    write_dpo_dir(tmp_path / "data", make_pairs(4, 10), make_pairs(2, 11))
    with pytest.raises(ValueError, match="dpo_reference='adapter_off' needs a method that, switched off, is the "
                                         "starting model, and peft_method='full' is not one"):
        run_train(dpo_flags(tmp_path, peft_method="full", dpo_reference="adapter_off"), monkeypatch)
