"""objective='sft': the masked loss against transformers, packing without cross-talk, DDP and resume through train.py."""
import json

import numpy as np
import pytest
import torch

import training.checkpoint as checkpoint
from model import GPT, LLaMA
from prepare_sft import HEADER, write_split
from loaders.sft import SFTLoader
from test_train import read_log, run_torchrun, run_train, run_until_the_first_checkpoint, tiny_flags

transformers = pytest.importorskip("transformers")
VOCAB = 128


def make_examples(n, seed, max_answer=24, max_len=32):
    """(ids, mask) pairs with prompts of 3-8 tokens and answers of 1..max_answer tokens (very different lengths)."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        prompt, answer = int(rng.integers(3, 9)), int(rng.integers(1, max_answer + 1))
        answer = min(answer, max_len - prompt)
        ids = rng.integers(1, VOCAB, prompt + answer)
        examples.append((ids.tolist(), [0] * prompt + [1] * answer))
    return examples


def write_sft_dir(folder, train, val):
    """A data folder as prepare_sft.py writes it, from (ids, mask) pairs."""
    folder.mkdir(parents=True)
    for split, examples in (("train", train), ("val", val)):
        write_split(folder, split, examples, np.uint16, shard_size=10_000)
    (folder / HEADER).write_text(json.dumps({"tokenizer": "gpt2", "eos_id": 0, "pad_id": 0, "vocab_size": VOCAB}))
    return folder


def tiny_models(tmp_path, family):
    """A random Hugging Face model and ours loaded from its folder (the same weights)."""
    torch.manual_seed(0)
    if family == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0)).eval()
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, initializer_range=0.2)).eval()
    hf.save_pretrained(tmp_path / family)
    ours = (GPT if family == "gpt2" else LLaMA).from_pretrained(tmp_path / family).eval()
    return hf, ours


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_masked_loss_of_a_padded_batch_equals_transformers_loss_with_labels_minus_100(tmp_path, family):
    examples = make_examples(4, seed=0)
    loader = SFTLoader(write_sft_dir(tmp_path / "data", examples, examples), 4, 32, split="val", packing=False)
    x, y, position_ids = next(loader.eval_batches())
    assert position_ids is None and x.size(1) == max(len(ids) for ids, _ in examples) - 1  # padded to the longest
    hf, ours = tiny_models(tmp_path, family)
    # the reference sees whole examples, right-padded, labels -100 on prompt and padding; it shifts them itself
    L = max(len(ids) for ids, _ in examples)
    input_ids = torch.zeros(4, L, dtype=torch.long)
    labels = torch.full((4, L), -100)
    attention_mask = torch.zeros(4, L, dtype=torch.long)
    for i, (ids, mask) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(ids)] = torch.where(torch.tensor(mask) == 1, torch.tensor(ids), -100)
        attention_mask[i, :len(ids)] = 1
    with torch.no_grad():
        expected = hf(input_ids, attention_mask=attention_mask, labels=labels).loss
        _, loss = ours(x, y)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_each_example_in_a_packed_row_has_the_logits_it_has_alone(tmp_path, family):
    examples = make_examples(8, seed=1, max_answer=10)
    loader = SFTLoader(write_sft_dir(tmp_path / "data", examples, examples), 2, 48, split="val", packing=True)
    rows = loader.rows_of_epoch(0)[:2]
    assert all(len(row) >= 2 for row in rows)
    x, _, position_ids = loader.collate(rows)
    _, ours = tiny_models(tmp_path, family)
    with torch.no_grad():
        packed = ours(x, position_ids=position_ids)[0]  # (2, 48, V)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                ids = torch.tensor(examples[i][0][:-1])[None]  # the example's inputs alone: (1, n - 1)
                alone = ours(ids)[0][0]
                assert (packed[r, start:start + ids.size(1)] - alone).abs().max().item() < 1e-5
                start += ids.size(1)


def sft_flags(tmp_path, **overrides):
    flags = dict(objective="sft", block_size=32, batch_size=2, total_batch_size=2 * 32 * 4, max_steps=3,
                 eval_interval=2, eval_iters=2, vocab_size=VOCAB)
    flags.update(overrides)
    return tiny_flags(tmp_path, **flags)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_twice_the_accumulation_on_uneven_answers(tmp_path, monkeypatch):
    # answers of 1 to 24 tokens: each micro-batch holds a different number of answer tokens, so the step's loss is
    # only right if the count of the whole step (all micro-steps, both ranks) divides the summed loss
    write_sft_dir(tmp_path / "data", make_examples(40, seed=2), make_examples(6, seed=3))
    extra = dict(eval_generate_every=2, eval_iters=0)  # eval_iters=0: the whole val split, however it is shared
    run_train(sft_flags(tmp_path, out_dir=tmp_path / "single", **extra), monkeypatch)
    result = run_torchrun(sft_flags(tmp_path, out_dir=tmp_path / "ddp", **extra))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    single, ddp = read_log(tmp_path / "single"), read_log(tmp_path / "ddp")
    for key, rel in (("train_loss", 1e-5), ("grad_norm", 1e-4), ("val_loss", 1e-5), ("val_exact_match", 0)):
        assert [r[key] for r in ddp if key in r] == pytest.approx([r[key] for r in single if key in r], rel=rel), key
    assert [r["step"] for r in ddp if "val_exact_match" in r] == [0, 2]


def test_sft_run_resumes_at_its_data_position_with_the_same_losses(tmp_path, monkeypatch):
    write_sft_dir(tmp_path / "data", make_examples(24, seed=4), make_examples(4, seed=5))
    flags = dict(max_steps=6, eval_interval=0, total_batch_size=2 * 32 * 2)
    run_train(sft_flags(tmp_path, out_dir=tmp_path / "whole", **flags), monkeypatch)
    run_until_the_first_checkpoint(sft_flags(tmp_path, out_dir=tmp_path / "split", checkpoint_interval=3, **flags),
                                   monkeypatch)
    assert checkpoint.read_checkpoint(tmp_path / "split")["loader"] != {"epoch": 0, "row": 0}
    run_train(sft_flags(tmp_path, out_dir=tmp_path / "split", init_from="resume", **flags), monkeypatch)
    whole, split = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert [r["train_loss"] for r in split] == [r["train_loss"] for r in whole]


def test_the_loss_falls_on_the_answers_without_packing(tmp_path, monkeypatch):
    # prompts of random tokens, answers of tokens 5 and 6 only: ln(128) = 4.85 nats at the start, ln 2 learnable
    rng = np.random.default_rng(6)
    examples = [(rng.integers(1, VOCAB, 4).tolist() + rng.integers(5, 7, 3).tolist(), [0] * 4 + [1] * 3)
                for _ in range(32)]
    write_sft_dir(tmp_path / "data", examples, examples[:4])
    run_train(sft_flags(tmp_path, packing=False, max_steps=20, eval_interval=0), monkeypatch)
    losses = [r["train_loss"] for r in read_log(tmp_path / "out")]
    assert losses[0] == pytest.approx(np.log(VOCAB), abs=0.3)
    assert np.mean(losses[-5:]) < losses[0] - 2.0


def ids_tokenizer(eos):
    """A tokenizer whose text is the token ids as numbers, space separated: what exact_match decodes with."""
    from types import SimpleNamespace
    return SimpleNamespace(eos_id=eos, decode=lambda ids: " ".join(map(str, ids)))


def hf_greedy(hf, prompt, n, eos):
    """transformers' greedy continuation of one prompt, n new tokens (EOS included if it comes)."""
    with torch.no_grad():
        return hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                           pad_token_id=eos)[0, len(prompt):].tolist()


def test_exact_match_counts_the_answers_transformers_greedy_decoding_reproduces(tmp_path):
    """Prompts of several lengths, decoded together in padded batches; half the references are transformers' own greedy
    continuation (one prompt at a time), half are random."""
    from evals.exact_match import exact_match
    hf, ours = tiny_models(tmp_path, "gpt2")
    eos = 0
    tok = ids_tokenizer(eos)
    rng = np.random.default_rng(3)
    examples, expected = [], 0
    for i in range(30):
        prompt = rng.integers(1, VOCAB, int(rng.integers(3, 7))).tolist()
        n_answer = int(rng.integers(1, 6))
        out = hf_greedy(hf, prompt, n_answer, eos)
        greedy = out[:out.index(eos)] if eos in out else out
        answer = greedy if i % 2 == 0 and greedy else rng.integers(1, VOCAB, n_answer).tolist()
        expected += answer == greedy
        examples.append((np.array(prompt + answer + [eos]), np.array([0] * len(prompt) + [1] * (len(answer) + 1))))
    assert 10 <= expected < 30
    assert exact_match(ours, examples, tok, "cpu", extra_tokens=0, batch_size=4) == (expected, 30)


# --- how a greedy answer is scored: the whole answer, or its last number --------------------------------------------
WORKED = "40 + 30 = 70. 7 + 8 = 15. 70 + 15 = 85. The answer is 85."


@pytest.mark.parametrize("completion, reference, exact, numeric", [
    (WORKED, WORKED, True, True),
    (" 85\n", WORKED, False, True),  # the result alone, for a worked reference
    ("40 + 30 = 70. 7 + 8 = 15. 70 + 15 = 85. The answer is 86.", WORKED, False, False),
    ("The answer is 85, I think.", "85", False, True),
    ("I cannot add these.", WORKED, False, False),  # no number
    ("", "", True, False),  # a reference without a number matches nothing by number
    ("1,786", "The answer is 1786.", False, True),
])
def test_numeric_reads_the_last_number_where_exact_compares_the_whole_answer(completion, reference, exact, numeric):
    from evals.exact_match import is_match
    assert is_match("exact", completion, reference) is exact
    assert is_match("numeric", completion, reference) is numeric


def test_numeric_match_counts_the_completions_whose_last_number_transformers_greedy_decoding_reproduces(tmp_path):
    """The decoded text is the token ids as numbers: a completion's last number is its last token. Each reference is
    random tokens ending with the greedy continuation's last token or not: exact sees none of them, numeric those."""
    from evals.exact_match import exact_match
    hf, ours = tiny_models(tmp_path, "gpt2")
    eos = 0
    tok = ids_tokenizer(eos)
    rng = np.random.default_rng(4)
    examples, expected = [], 0
    for i in range(20):
        prompt = rng.integers(1, VOCAB, int(rng.integers(3, 7))).tolist()
        greedy = hf_greedy(hf, prompt, 4, eos)
        if eos in greedy[:4]:
            continue
        answer = rng.integers(1, VOCAB, 4).tolist()
        if i % 2 == 0:
            answer[-1] = greedy[-1]
        expected += answer[-1] == greedy[-1]
        examples.append((np.array(prompt + answer + [eos]), np.array([0] * len(prompt) + [1] * 5)))
    assert 5 <= expected < len(examples)
    assert exact_match(ours, examples, tok, "cpu", extra_tokens=0, batch_size=4, match="numeric") == (expected,
                                                                                                       len(examples))
    assert exact_match(ours, examples, tok, "cpu", extra_tokens=0, batch_size=4)[0] < expected


def test_eval_generate_match_numeric_logs_val_numeric_match_and_a_bad_value_is_refused_in_one_line(tmp_path,
                                                                                                  monkeypatch):
    from tools.errors import UserError
    write_sft_dir(tmp_path / "data", make_examples(12, seed=8), make_examples(4, seed=9))
    run_train(sft_flags(tmp_path, eval_generate_every=2, eval_generate_match="numeric"), monkeypatch)
    log = read_log(tmp_path / "out")
    assert [r["step"] for r in log if "val_numeric_match" in r] == [0, 2]
    assert all("val_exact_match" not in r and 0 <= r.get("val_numeric_match", 0) <= 1 for r in log)
    refusals = [({"eval_generate_match": "fuzzy"},
                 "eval_generate_match='fuzzy' is not valid: it must be one of 'exact', 'numeric'"),
                ({"objective": "lm", "eval_generate_match": "numeric"},  # like eval_generate_every: sft's own
                 "eval_generate_match='numeric' is a setting of objective='sft', and this run has objective='lm'")]
    for flags, message in refusals:
        with pytest.raises(UserError, match=message) as refused:
            run_train(sft_flags(tmp_path, out_dir=tmp_path / "refused", **flags), monkeypatch)
        assert "\n" not in str(refused.value)
