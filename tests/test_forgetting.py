"""evals/forgetting.py: the loss on the base's own replies, and the closed questions the base knows.

References: F.cross_entropy on full logits, one pair at a time (reply_nll batches, pads and uses the chunked loss);
ln V for a model whose logits are all zero; generate() on each prompt alone (base_replies batches); the plain chat
template's known text; a stub model that replies from a table, for the closed questions.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from evals import forgetting
from model import GPT, GPTConfig
from tokenization import load_tokenizer

VOCAB = 50304  # GPT-2's tokenizer (offline) encodes the prompts: its 50,257 ids must fit


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("gpt2")


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=128, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # larger weights than the N(0, 0.02) init: confident, varied predictions
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    return model


PAIRS = [([5, 9, 11], [3, 4, 50256]), ([7], [8, 8, 2, 6, 1]), ([1, 2, 3, 4, 5, 6], [9])]


def test_reply_nll_is_the_cross_entropy_of_the_reply_tokens_only_over_all_replies():
    model = tiny_gpt()
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, reply in PAIRS:  # each pair alone, unpadded, full logits
            seq = torch.tensor([prompt + reply])
            logits = model(seq)[0][0]  # (T, V)
            total += F.cross_entropy(logits[len(prompt) - 1:-1], torch.tensor(reply), reduction="sum").item()
            count += len(reply)
    assert forgetting.reply_nll(model, PAIRS) == pytest.approx(total / count, rel=1e-5)


def test_a_model_whose_logits_are_all_zero_has_reply_nll_ln_v():
    model = tiny_gpt()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0 everywhere: every token has probability 1 / V
    assert forgetting.reply_nll(model, PAIRS) == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_base_replies_are_each_prompts_greedy_reply_alone_in_the_chat_template(tok):
    model = tiny_gpt()
    pairs = forgetting.base_replies(model, tok, max_new_tokens=6, limit=5)
    assert len(pairs) == 5
    for text, (prompt, reply) in zip(forgetting.sets()["open"], pairs):
        assert tok.decode(prompt) == f"<|endoftext|>User: {text}\n\nAssistant:"  # the plain template, rendered
        alone = model.generate(torch.tensor([prompt]), 6, temperature=0, eos_id=tok.eos_id)[0, len(prompt):]
        alone = alone.tolist()
        assert reply == (alone[:alone.index(tok.eos_id) + 1] if tok.eos_id in alone else alone)


def test_the_forgetting_score_is_zero_for_the_base_and_grows_as_its_weights_move_away(tok):
    base = tiny_gpt()
    pairs = forgetting.base_replies(base, tok, max_new_tokens=8, limit=6)
    base_nll = forgetting.reply_nll(base, pairs)
    assert forgetting.reply_nll(copy.deepcopy(base), pairs) - base_nll == 0.0  # the same weights: exactly 0

    def moved(scale):
        model = copy.deepcopy(base)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        return forgetting.reply_nll(model, pairs) - base_nll

    small, large = moved(0.02), moved(0.2)
    assert 0 < small < large


# --- closed questions ---------------------------------------------------------------------------------------------
class Cache:
    def __init__(self, pad):
        self.pad, self.rows = pad, None


class TableModel(torch.nn.Module):
    """A stub language model: greedy decoding gives, for a prompt that contains question q of the closed set,
    the text table[q] and then EOS; for any other prompt 'I do not know.'"""
    max_seq_len = 4096
    num_virtual_tokens = 0

    def __init__(self, tok, table):
        super().__init__()
        self.tok, self.table, self.unused = tok, table, torch.nn.Parameter(torch.zeros(1))

    def make_kv_cache(self, batch_size, max_len, pad=None):
        return Cache(pad)

    def reply_for(self, prompt_text):
        for q, text in self.table.items():
            if forgetting.sets()["closed"][q]["q"] in prompt_text:
                return text
        return "I do not know."

    def forward(self, idx, kv_cache=None, logits_to_keep=0, **_):
        if kv_cache.rows is None:  # the prefill: the (left-padded) prompts
            pad = kv_cache.pad.tolist() if kv_cache.pad is not None else [0] * idx.size(0)
            kv_cache.rows = [dict(prompt=self.tok.decode(row[n:].tolist()), new=[]) for row, n in zip(idx, pad)]
        else:
            for state, token in zip(kv_cache.rows, idx[:, 0].tolist()):
                state["new"].append(token)
        logits = torch.full((idx.size(0), 1, self.tok.vocab_size), -1e4)
        for b, state in enumerate(kv_cache.rows):
            reply = self.tok.encode(self.reply_for(state["prompt"]), add_special_tokens=False) + [self.tok.eos_id]
            n = len(state["new"])
            logits[b, 0, reply[n] if n < len(reply) else self.tok.eos_id] = 0.0
        return logits, None


def test_known_questions_are_those_the_base_answers_and_a_tuned_model_is_scored_on_them_only(tok):
    # questions 0, 1, 2, 4 of the set: capitals of France, Japan, Italy, Spain
    base = TableModel(tok, {0: "It is Paris.", 1: "Kyoto, I think.", 2: "The capital is Rome!", 4: "Madrid"})
    known = forgetting.known_questions(base, tok, limit=6)
    assert known == [0, 2, 4]  # 1 is wrong, 3 and 5 get 'I do not know.'
    assert forgetting.question_accuracy(base, tok, known) == 1.0
    tuned = TableModel(tok, {0: "Paris", 1: "Tokyo", 2: "Milan", 4: "I would say Barcelona."})
    assert forgetting.question_accuracy(tuned, tok, known) == pytest.approx(1 / 3)  # 1 (Tokyo) is not among them
    assert forgetting.question_accuracy(tuned, tok, []) is None


@pytest.mark.parametrize("reply, accepted, right", [
    ("The capital is Paris.", ["paris"], True),
    ("Parisian food is good.", ["paris"], False),  # whole words only
    ("It makes CO2!", ["carbon dioxide", "co2"], True),
    ("The Blue-Whale, by far", ["blue whale"], True),
    ("A whale that is blue", ["blue whale"], False),
    ("There are 8 legs.", ["8", "eight"], True),
    ("There are 18 legs.", ["8", "eight"], False),
])
def test_an_answer_counts_when_an_accepted_form_occurs_as_whole_words(reply, accepted, right):
    assert forgetting.is_right(reply, accepted) is right


def test_the_sets_are_the_documented_sizes_and_every_question_has_an_answer():
    data = forgetting.sets()
    assert len(data["open"]) == 40 and len(set(data["open"])) == 40
    assert len(data["closed"]) == 60 and all(q["q"].endswith("?") and q["a"] for q in data["closed"])
    assert all(text.isascii() for text in data["open"] + [q["q"] for q in data["closed"]])
