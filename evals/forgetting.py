"""Forgetting: how far a tuned model moved from its base on what its task did not teach.

Two fixed sets of chats, written by hand for this file and unrelated to the tasks we tune on (Shakespeare's
speakers, arithmetic), live in forgetting_sets.json beside it:
    open     40 open requests (explain, list, rewrite, advise, write code ...): no single right reply
    closed   60 questions with short, unambiguous answers (capitals, simple science, word meanings, common facts),
             each with the few answer strings that count as right

Open prompts: the loss on the answers the base itself gave. The base replies to every open prompt greedily, once
(base_replies); a model's score is the mean negative log-likelihood per token of those replies given their prompts
(reply_nll), and the forgetting score of a tuned model is

    reply_nll(tuned, pairs) - reply_nll(base, pairs)        0 for the base itself

Why this is a fair measure of forgetting: the text is the base's own (its greedy reply: the sequence it ranks
highest), on prompts the task never showed, so it asks only "does the tuned model still say what the base said?",
independently of whether those replies were good. reply_nll is the cross-entropy between the point mass on the
base's greedy replies and the tuned model: the same direction as KL(base || tuned), the probability mass the
tuned model took away from what the base says, estimated at one point (the base's mode) instead of in expectation
over the base's samples. It needs no reference answers and no judge, and it is deterministic.
Its limits: one reply per prompt (the mode, not the base's distribution), so it is an estimate of that KL, neither
unbiased nor a bound; a tuned model that grew more confident of the base's replies scores below 0; replies are cut
at max_new_tokens; 40 prompts is a small sample of "everything else"; and a method that changes every input (prompt
and prefix tuning prepend their virtual tokens to these prompts too, QLoRA quantizes the base) is scored with that
change included.

Closed questions: the base is asked each one greedily; known_questions are those it answers right (the normalised
reply contains one of the accepted answers as whole words), and question_accuracy is a tuned model's accuracy on
exactly those (1.0 for the base by construction): knowledge the base had and the tuned model lost. Coarse (a few
dozen questions), and a reply that lists several answers counts as right.
"""
import functools
import json
import re
from pathlib import Path

import torch

from model.generate import batch_generate
from tokenization.chat import generation_prompt_ids

SETS = Path(__file__).with_name("forgetting_sets.json")
QUESTION_SUFFIX = " Answer in a few words."  # short replies: the answer, not an essay around it


@functools.lru_cache(maxsize=1)
def sets():
    """{'open': [prompt, ...], 'closed': [{'q': question, 'a': [accepted answer, ...]}, ...]}"""
    with open(SETS, encoding="utf-8") as f:
        return json.load(f)


def chat_prompt(tok, text):
    """Token ids of one user turn and the generation prompt, rendered with the model's chat template."""
    return generation_prompt_ids(tok, [{"role": "user", "content": text}])


def greedy_replies(model, tok, prompts, max_new_tokens, batch_size=32):
    """[reply ids]: each prompt (ids) completed greedily, up to and including EOS."""
    was_training = model.training
    model.eval()
    replies = []
    for i in range(0, len(prompts), batch_size):
        replies += batch_generate(model, prompts[i:i + batch_size], max_new_tokens, temperature=0.0, eos_id=tok.eos_id)
    model.train(was_training)
    return replies


# --- open prompts: the loss on the base's own replies ------------------------------------------------------------
def base_replies(model, tok, max_new_tokens=48, limit=0):
    """[(prompt_ids, reply_ids)]: the base's greedy reply (EOS included when it ended) to each open prompt
    (the first `limit` of them; 0 = all)."""
    prompts = [chat_prompt(tok, text) for text in sets()["open"][:limit or None]]
    return list(zip(prompts, greedy_replies(model, tok, prompts, max_new_tokens)))


@torch.no_grad()
def reply_nll(model, pairs):
    """Mean negative log-likelihood per reply token (over all replies' tokens together) of the replies given their
    prompts: one forward of the prompt + reply rows, right-padded, the loss masked to the reply tokens."""
    device = next(model.parameters()).device
    T = max(len(p) + len(r) for p, r in pairs) - 1
    x = torch.zeros(len(pairs), T, dtype=torch.long)  # the pad id is any token: nothing before it attends to it
    y = torch.full((len(pairs), T), -1, dtype=torch.long)  # -1: not a target
    for i, (prompt, reply) in enumerate(pairs):
        seq = list(prompt) + list(reply)
        x[i, :len(seq) - 1] = torch.tensor(seq[:-1])
        y[i, len(prompt) - 1:len(seq) - 1] = torch.tensor(list(reply))  # position t predicts token t + 1
    was_training = model.training
    model.eval()
    _, loss = model(x.to(device), y.to(device))  # mean over the targets != -1: every reply token
    model.train(was_training)
    return loss.item()


# --- closed questions: knowledge the base had --------------------------------------------------------------------
def normalise(text):
    """lower case, punctuation as spaces, single spaces: 'The  Blue-Whale!' -> 'the blue whale'."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def is_right(reply, accepted):
    """Whether one of the accepted answers occurs in the reply as whole words (both normalised)."""
    padded = f" {normalise(reply)} "
    return any(f" {normalise(answer)} " in padded for answer in accepted)


def answers_right(model, tok, indices, max_new_tokens=24):
    """[bool]: whether the model's greedy reply to each closed question (by index) is right."""
    questions = [sets()["closed"][i] for i in indices]
    prompts = [chat_prompt(tok, q["q"] + QUESTION_SUFFIX) for q in questions]
    replies = greedy_replies(model, tok, prompts, max_new_tokens)
    return [is_right(tok.decode([t for t in reply if t != tok.eos_id]), q["a"])
            for reply, q in zip(replies, questions)]


def known_questions(model, tok, limit=0, max_new_tokens=24):
    """Indices of the closed questions (the first `limit`; 0 = all) that the model (the base) answers right."""
    indices = list(range(len(sets()["closed"][:limit or None])))
    return [i for i, right in zip(indices, answers_right(model, tok, indices, max_new_tokens)) if right]


def question_accuracy(model, tok, indices, max_new_tokens=24):
    """The model's accuracy on the closed questions `indices` (the base's known ones); None when there are none."""
    if not indices:
        return None
    right = answers_right(model, tok, indices, max_new_tokens)
    return sum(right) / len(right)
