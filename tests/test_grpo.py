"""objective='grpo': its closed forms (advantages, the clipped surrogate, k3, TRL's three normalisations, step 0 of a
fresh adapter), the rewards, prompt folders, and train.py runs: a tiny model learns a verifiable reward, two
processes take the steps of one, a resume continues bit for bit."""
import contextlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import objectives.grpo as grpo
import objectives.rewards as rewards
from combinations_cells import train_defaults
from loaders.grpo import PromptLoader
from objectives import Run
from prepare_sft import HEADER, prepare, write_split
from test_dpo import tiny_lora_gpt
from test_train import read_log, run_torchrun, run_train, run_until_the_first_checkpoint, tiny_flags
from tools.errors import UserError

VOCAB = 16  # GPT-2's first 16 ids, one character each ('!"#$%&'()*+,-./0'); id 0 ('!') is our EOS


# ---- data: prompts whose one-character answer depends on their last token ---------------------------------------
def make_prompts(n, seed):
    """[(ids, target)]: 1-4 tokens of ids 1..15; the answer is one character, '0' (id 15) after a last token of 1..7,
    '/' (id 14) after 8..15. Chance: 1 in 16 tokens."""
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        ids = rng.integers(1, 16, int(rng.integers(1, 5))).tolist()
        prompts.append((ids, {"answer": "0" if ids[-1] <= 7 else "/", "where": f"tiny.jsonl:{i + 1}", "question": ""}))
    return prompts


def write_prompt_dir(folder, train, val):
    """A prompt folder as prepare_sft.py writes it (GPT-2's tokenizer named, EOS 0, 16 ids)."""
    folder.mkdir(parents=True)
    for split, prompts in (("train", train), ("val", val)):
        write_split(folder, split, [(ids, [0] * len(ids), json.dumps(t)) for ids, t in prompts], np.uint16, 10_000)
    (folder / HEADER).write_text(json.dumps({"kind": "prompt", "tokenizer": "gpt2", "eos_id": 0, "pad_id": 0,
                                             "vocab_size": VOCAB, "splits": {}}))
    return folder


def objective(**settings):
    """A GRPO row over train.py's defaults and `settings`, outside train.py."""
    config = {**train_defaults(), "objective": "grpo", **settings}
    return grpo.GRPO(Run(config, "cpu", contextlib.nullcontext()))


# ---- closed forms -----------------------------------------------------------------------------------------------
def test_advantages_are_the_group_relative_rewards_trl_computes():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])  # two groups of 4
    advantages, zero_std = grpo.group_advantages(r, 4)
    # group 1: mean 1/4, unbiased std sqrt((9/16 + 3/16) / 3) = 1/2; group 2: mean 1/2, std sqrt(1/3)
    s1, s2 = 0.5 + 1e-4, math.sqrt(1 / 3) + 1e-4
    expected = [0.75 / s1, -0.25 / s1, -0.25 / s1, -0.25 / s1, 0.5 / s2, 0.5 / s2, -0.5 / s2, -0.5 / s2]
    assert advantages.tolist() == pytest.approx(expected, rel=1e-6)
    assert grpo.group_advantages(r, 4, scale=False)[0].tolist() == [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5]
    assert not zero_std.any()


def completion_batch(model, rows, lengths, rewards_, G, prompt_len=3, seed=0):
    """A prepared batch by hand: rows completions of the given lengths after random prompts, rewarded."""
    g = torch.Generator().manual_seed(seed)
    L = prompt_len + max(lengths) - 1
    x = torch.randint(1, 32, (rows, L), generator=g)
    y = torch.full((rows, L), -1)
    for r, n in enumerate(lengths):
        y[r, prompt_len - 1:prompt_len - 1 + n] = torch.randint(1, 32, (n,), generator=g)
        x[r, prompt_len:prompt_len + n - 1] = y[r, prompt_len - 1:prompt_len + n - 2]  # the completion is fed back
    rewards_ = torch.tensor(rewards_, dtype=torch.float)
    advantages, zero_std = grpo.group_advantages(rewards_, G)
    return x, y, advantages, rewards_, zero_std, torch.zeros(rows, dtype=torch.bool)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_equal_rewards_in_a_group_give_zero_advantages_and_without_kl_a_zero_gradient(loss_type):
    model = tiny_lora_gpt(b_scale=0.3)  # an adapter that has moved: the policy is not the reference
    task = objective(grpo_beta=0.0, grpo_loss_type=loss_type, grpo_max_new_tokens=4)
    batch = completion_batch(model, 8, [1, 2, 3, 4, 4, 3, 2, 1], [1, 1, 1, 1, 0, 0, 0, 0], G=4)
    assert batch[2].tolist() == [0.0] * 8 and batch[4].all()  # zero advantages, every group's std is 0
    loss_sum, sums = task.loss(model, batch)
    (loss_sum / task.count(batch)).backward()
    assert loss_sum.item() == 0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert task.metrics(sums)["frac_reward_zero_std"] == 1.0


def test_at_step_0_a_fresh_adapter_has_zero_kl_and_equal_lengths_a_zero_policy_loss():
    model = tiny_lora_gpt()  # B = 0: switched off or not, the same model
    task = objective(grpo_beta=0.04, grpo_loss_type="dapo", peft_method="lora")
    task.model, task.ref_model = model, None
    batch = completion_batch(model, 8, [3] * 8, [1, 0, 0, 1, 0, 0, 0, 1], G=4)
    loss_sum, sums = task.loss(model, batch)
    metrics = task.metrics(sums)
    assert metrics["kl"] == 0 and metrics["clip_ratio"] == 0
    assert (loss_sum / task.count(batch)).item() == pytest.approx(0, abs=1e-7)  # sum of A over a group is 0
    loss_sum.backward()  # yet the gradient moves the policy toward the rewarded completions
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    # unequal lengths: -sum_i A_i L_i / sum_i L_i, the policy loss of ratio 1 (dapo weighs every token alike)
    lengths = [1, 2, 3, 4, 4, 3, 2, 1]
    batch = completion_batch(model, 8, lengths, [1, 0, 0, 1, 0, 0, 0, 1], G=4)
    expected = -(batch[2] * torch.tensor(lengths)).sum().item() / sum(lengths)
    assert (task.loss(model, batch)[0] / task.count(batch)).item() == pytest.approx(expected, rel=1e-6)


def trl_loss(per_token, mask, loss_type, max_completion_length):
    """TRL's GRPOTrainer._compute_loss normalisations, on (B, T) per-token losses and their completion mask."""
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dapo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    return (per_token * mask).sum() / (per_token.size(0) * max_completion_length)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_the_clipped_objective_has_its_hand_computed_value_and_gradient_and_trls_normalisation(loss_type):
    # five tokens, eps = 0.2: ratio 1.5 with A > 0 is clipped (no gradient), with A < 0 it is not; 0.5 likewise
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.1])
    A = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    old = torch.log(torch.tensor([0.2, 0.3, 0.4, 0.1, 0.25]))
    logps = (old + ratio.log()).requires_grad_()
    per_token, clipped = grpo.clipped_surrogate(logps, old, A, 0.2)
    assert per_token.tolist() == pytest.approx([-1.2, 1.5, -0.5, 0.8, -2.2], rel=1e-6)  # -min(rA, clip(r)A)
    assert clipped.tolist() == [True, False, False, True, False]
    per_token.sum().backward()
    assert logps.grad.tolist() == pytest.approx([0.0, 1.5, -0.5, 0.0, -2.2], rel=1e-6)  # d(-rA)/dlog r = -rA
    # completions: tokens {0, 1} and {2, 3, 4}; TRL's normalisations on the padded (2, 3) layout
    row, max_new = torch.tensor([0, 0, 1, 1, 1]), 4
    task = objective(grpo_loss_type=loss_type, grpo_max_new_tokens=max_new)
    y = torch.tensor([[7, 7, -1], [7, 7, 7]])
    dense, mask = torch.zeros(2, 3), (y != -1).float()
    dense[mask.bool()] = per_token.detach()
    ours = grpo.aggregate(per_token.detach(), row, 2, loss_type) / task.count((torch.zeros(2, 3), y))
    assert ours.item() == pytest.approx(trl_loss(dense, mask, loss_type, max_new).item(), rel=1e-6)


def test_k3_is_nonnegative_zero_at_the_reference_and_its_mean_under_the_policy_is_the_kl():
    g = torch.Generator().manual_seed(0)
    logp = F.log_softmax(torch.randn(4, 50, generator=g), -1)
    ref = F.log_softmax(torch.randn(4, 50, generator=g), -1)
    assert (grpo.k3(logp, ref) >= 0).all() and not grpo.k3(logp, logp).any()
    expected_k3 = (logp.exp() * grpo.k3(logp, ref)).sum(-1)  # E_{x ~ pi} k3(x), every x weighed exactly
    kl = F.kl_div(ref, logp, log_target=True, reduction="none").sum(-1)  # KL(pi || ref)
    assert expected_k3.tolist() == pytest.approx(kl.tolist(), rel=1e-5)


# ---- rewards ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,completion,answer,expected", [
    ("exact", " 48 ", "48", 1.0), ("exact", "48.", "48", 0.0), ("exact", "The answer is 48", "48", 0.0),
    ("numeric", "The answer is 1,234.", "1234", 1.0), ("numeric", "0.50", "0.5", 1.0),
    ("numeric", "12, no: 13", "12", 0.0),
    ("numeric", "-3", "-3", 1.0), ("numeric", "3", "-3", 0.0), ("numeric", "no number", "7", 0.0),
    ("numeric", "x = 42", "#### 42", 1.0)])
def test_the_built_in_rewards(name, completion, answer, expected):
    assert rewards.score(name, completion, {"answer": answer, "where": "t.jsonl:1"}) == expected


def test_a_reward_that_raises_or_is_not_finite_stops_in_one_line_naming_the_reward_and_the_record(monkeypatch):
    with pytest.raises(UserError, match=r"grpo_reward='numeric' failed on t.jsonl:3 \(ValueError: the answer 'seven' "
                                        r"holds no number\)"):
        rewards.check("numeric", [{"answer": "7", "where": "t.jsonl:2"}, {"answer": "seven", "where": "t.jsonl:3"}])
    monkeypatch.setitem(rewards.REWARDS, "exact", lambda completion, target: float("nan"))
    with pytest.raises(UserError, match="grpo_reward='exact' gave nan on t.jsonl:4: a reward must be a finite number"):
        rewards.score("exact", "7", {"answer": "7", "where": "t.jsonl:4"})


def test_reasoning_gym_missing_is_one_line_with_the_pip_command(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "reasoning_gym", None)  # import fails
    rewards.reasoning_gym_verifier.cache_clear()
    with pytest.raises(UserError, match=r"needs the package reasoning-gym: pip install -r requirements-grpo.txt"):
        rewards.score("reasoning_gym", "3", {"answer": "3", "task": "basic_arithmetic", "where": "t.jsonl:1"})
    rewards.reasoning_gym_verifier.cache_clear()


def test_reasoning_gym_verifiers_score_its_own_entries():
    reasoning_gym = pytest.importorskip("reasoning_gym")  # the optional extra (requirements-grpo.txt)
    for entry in reasoning_gym.create_dataset("basic_arithmetic", size=3, seed=1):
        target = {"answer": entry["answer"], "task": "basic_arithmetic", "metadata": entry["metadata"],
                  "question": entry["question"], "where": "rg.jsonl:1"}
        assert rewards.score("reasoning_gym", f"<answer>{entry['answer']}</answer>", target) == 1.0
        assert rewards.score("reasoning_gym", "nonsense", target) == 0.0
    with pytest.raises(UserError, match="t.jsonl:9 .*names no task"):
        rewards.check("reasoning_gym", [{"answer": "1", "where": "t.jsonl:9"}])


# ---- prompt folders ---------------------------------------------------------------------------------------------
def test_prepare_sft_writes_prompts_with_their_answers_and_the_loader_reads_them(tmp_path):
    from tokenization import load_tokenizer
    from tokenization.chat import generation_prompt_ids
    records = [{"prompt": "2 + 2 =", "answer": 4},
               {"messages": [{"role": "user", "content": "3 * 3?"}], "answer": "9", "task": "t", "metadata": {"k": 1}}]
    (tmp_path / "train.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    prepare(tmp_path / "train.jsonl", tmp_path / "train.jsonl", tmp_path / "data", block_size=64)
    loader = PromptLoader(tmp_path / "data", 2, 64, split="val")
    tok = load_tokenizer("gpt2")
    assert [ids.tolist() for ids, _ in loader.examples] == [
        tok.encode("2 + 2 ="), generation_prompt_ids(tok, records[1]["messages"])]
    assert [t["answer"] for t in loader.targets] == ["4", "9"]
    assert loader.targets[1]["task"] == "t" and loader.targets[1]["metadata"] == {"k": 1}
    assert [t["where"] for t in loader.targets] == [f"{tmp_path / 'train.jsonl'}:1", f"{tmp_path / 'train.jsonl'}:2"]
    # a prompt longer than block_size keeps its end (the question, the generation prompt), or is dropped
    header = prepare(tmp_path / "train.jsonl", tmp_path / "train.jsonl", tmp_path / "cut", block_size=4)
    assert header["splits"]["train"]["truncated"] == 2
    cut = PromptLoader(tmp_path / "cut", 2, 4, split="train")
    assert [ids.tolist() for ids, _ in cut.examples] == [tok.encode("2 + 2 =")[-4:],
                                                         generation_prompt_ids(tok, records[1]["messages"])[-4:]]
    short = len(tok.encode("2 + 2 ="))  # the chat is longer
    header = prepare(tmp_path / "train.jsonl", tmp_path / "train.jsonl", tmp_path / "dropped", block_size=short,
                     truncation="drop")
    assert (header["splits"]["train"]["dropped"], header["splits"]["train"]["examples"]) == (1, 1)


@pytest.mark.parametrize("record,message", [
    ({"prompt": "q", "answer": "1", "completion": "x"}, "has \"answer\" and 'completion'"),
    ({"prompt": "q", "answer": ""}, "field 'answer' must be a non-empty string or a number"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "answer": "1"},
     "must end with the user's question"),
    ({"answer": "1"}, "needs a \"prompt\" string or \"messages\"")])
def test_bad_prompt_records_stop_with_file_line_and_field(tmp_path, record, message):
    (tmp_path / "t.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match=f"t.jsonl:1: .*{message}".replace("(", r"\(").replace("?", r"\?")):
        prepare(tmp_path / "t.jsonl", tmp_path / "t.jsonl", tmp_path / "data")


def test_two_ranks_read_the_prompts_and_draws_one_process_reads(tmp_path):
    data = write_prompt_dir(tmp_path / "data", make_prompts(10, 0), make_prompts(4, 1))
    one = PromptLoader(data, 4, 8)
    ranks = [PromptLoader(data, 2, 8, rank, 2) for rank in range(2)]
    for _ in range(5):  # across the end of an epoch
        prompts, lengths, index, draws = one.next_batch()
        halves = [r.next_batch() for r in ranks]
        assert torch.cat([h[2] for h in halves]).tolist() == index.tolist()
        assert torch.cat([h[3] for h in halves]).tolist() == draws.tolist()
    assert draws.tolist() == list(range(16, 20))  # every visit of a prompt has its own draw


# ---- train.py ---------------------------------------------------------------------------------------------------
def grpo_flags(tmp_path, **overrides):
    flags = dict(objective="grpo", vocab_size=VOCAB, block_size=8, batch_size=4, total_batch_size=4 * 8,
                 grpo_num_generations=8, grpo_max_new_tokens=1, grpo_reward="exact", grpo_beta=0.04, max_steps=4,
                 eval_interval=2, eval_iters=0, max_lr=1e-2, warmup_steps=0, weight_decay=0.0)
    flags.update(overrides)
    return tiny_flags(tmp_path, **flags)


@pytest.mark.slow
def test_a_tiny_model_learns_a_verifiable_reward_from_chance_to_reliably_right(tmp_path, monkeypatch):
    write_prompt_dir(tmp_path / "data", make_prompts(64, 2), make_prompts(20, 3))
    # full fine-tuning of a model from scratch; its reference for the KL is a frozen copy of the model at step 0
    run_train(grpo_flags(tmp_path, max_steps=100, eval_interval=99, grpo_num_generations=16, max_lr=2e-3,
                         min_lr=2e-3), monkeypatch)
    log = read_log(tmp_path / "out")
    assert all(all(name in r for name in grpo.METRICS) for r in log)  # every step
    first, last = log[0], log[-1]
    assert first["kl"] == 0 and first["reward"] < 0.15  # chance: 1 in 16 tokens
    assert first["eval_reward"] < 0.3 and last["eval_reward"] >= 0.9  # greedy, on held-out prompts
    assert sum(r["reward"] for r in log[-5:]) / 5 > 0.8  # sampled: the policy itself, not only its mode


def tiny_base(folder):
    """A tiny random GPT saved as a Hugging Face folder: a base for LoRA."""
    from model import GPT
    torch.manual_seed(0)
    GPT(GPT.scratch_config(dict(block_size=16, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                                bias=True))).save_pretrained(folder)
    return str(folder)


def test_a_resumed_run_samples_and_steps_bit_for_bit_as_the_uninterrupted_one(tmp_path, monkeypatch):
    write_prompt_dir(tmp_path / "data", make_prompts(12, 4), make_prompts(4, 5))
    flags = dict(max_steps=4, eval_interval=3, dropout=0.1, init_from=tiny_base(tmp_path / "base"),
                 peft_method="lora", lora_r=4, lora_targets=("c_attn", "c_fc"), lora_dropout=0.1, max_lr=3e-2)
    run_train(grpo_flags(tmp_path, out_dir=tmp_path / "whole", **flags), monkeypatch)
    run_until_the_first_checkpoint(grpo_flags(tmp_path, out_dir=tmp_path / "split", checkpoint_interval=2, **flags),
                                   monkeypatch)
    run_train(grpo_flags(tmp_path, out_dir=tmp_path / "split", **{**flags, "init_from": "resume"}), monkeypatch)
    whole, split = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert [r["step"] for r in split] == [0, 1, 2, 3]
    for key in ("train_loss", "reward", "kl", "grad_norm", "eval_reward"):
        assert [r.get(key) for r in split] == [r.get(key) for r in whole], key


@pytest.mark.slow
def test_two_processes_sample_and_step_as_one_does(tmp_path, monkeypatch):
    write_prompt_dir(tmp_path / "data", make_prompts(16, 6), make_prompts(6, 7))
    flags = dict(batch_size=2, total_batch_size=2 * 8 * 2, max_steps=3, eval_interval=2)  # 2 micro-steps; 1 a rank
    run_train(grpo_flags(tmp_path, out_dir=tmp_path / "single", **flags), monkeypatch)
    result = run_torchrun(grpo_flags(tmp_path, out_dir=tmp_path / "ddp", **flags))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    single, ddp = read_log(tmp_path / "single"), read_log(tmp_path / "ddp")
    for key in ("reward", "completions/mean_length", "eval_reward"):  # the same samples
        assert [r.get(key) for r in ddp] == [r.get(key) for r in single], key
    for key in ("train_loss", "grad_norm", "kl", "entropy"):
        assert [r[key] for r in ddp] == pytest.approx([r[key] for r in single], rel=1e-4, abs=1e-7), key


@pytest.mark.parametrize("flags,message", [
    (dict(grpo_num_generations=1), "grpo_num_generations=1 is not valid: it must be an int >= 2"),
    (dict(grpo_temperature=0.0), "grpo_temperature=0.0 is not valid"),
    (dict(grpo_loss_type="bnpo"), "grpo_loss_type='bnpo' is not valid: it must be one of 'grpo', 'dapo', 'dr_grpo'"),
    (dict(peft_method="lora", lora_init="pissa"), "grpo_beta=0.04 needs a method that, switched off, is the starting "
                                                  "model, and lora_init='pissa'"),
    (dict(objective="sft"), "grpo_num_generations=8 is a setting of objective='grpo', and this run has "
                            "objective='sft'")])
def test_settings_grpo_cannot_take_are_refused_in_one_line(tmp_path, monkeypatch, flags, message):
    write_prompt_dir(tmp_path / "data", make_prompts(4, 8), make_prompts(2, 9))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_train(grpo_flags(tmp_path, **flags), monkeypatch)


def test_a_reasoning_gym_task_goes_through_prepare_sft_and_its_verifier_scores_its_answers(tmp_path):
    pytest.importorskip("reasoning_gym")  # the optional extra (requirements-grpo.txt)
    from tasks.reasoning_tasks import make
    make(tmp_path / "rg", "basic_arithmetic", n=6, n_val=3)
    prepare(tmp_path / "rg/train.jsonl", tmp_path / "rg/val.jsonl", tmp_path / "data", block_size=256)
    loader = PromptLoader(tmp_path / "data", 2, 256, split="train")
    assert all(t["task"] == "basic_arithmetic" and t["metadata"] for t in loader.targets)
    assert [rewards.score("reasoning_gym", t["answer"], t) for t in loader.targets] == [1.0] * 6  # by its verifier
    assert rewards.score("reasoning_gym", "not a number", loader.targets[0]) == 0.0
