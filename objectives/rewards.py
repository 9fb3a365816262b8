"""Verifiable rewards for objective='grpo': REWARDS, train.py's `grpo_reward` -> a function of (completion, target).

A reward reads the completion's text (its tokens up to, not including, the first EOS, decoded) and the record's
target, as prepare_sft.py stored it: {"answer": str, "where": "file:line", optional "task", "metadata",
"question"}. It returns a finite float, 1.0 for right and 0.0 for wrong here:

    exact          the completion, stripped of surrounding whitespace, is the answer (stripped)
    numeric        the last number in the completion equals the answer's last number (1,234 = 1234; 0.50 = 0.5)
    reasoning_gym  the record's task's own verifier: reasoning_gym's score_answer(completion, entry), in [0, 1]
                   (an optional extra: pip install -r requirements-grpo.txt; imported only when used)

A new reward is one function and one row. check() tries every target once before training (an answer without a
number, a record without a task, reasoning_gym missing: refused in one line naming the record), and score() stops
the run, naming the reward and the record, when a reward raises or returns something that is not a finite number.
"""
import functools
import math
import re
from fractions import Fraction

from tools.errors import UserError

NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")  # 12, -3, 1,234, 0.5, .5
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
INSTALL = "pip install -r requirements-grpo.txt (reasoning-gym)"


def exact(completion, target):
    return float(completion.strip() == target["answer"].strip())


def last_number(text):
    """The last number written in `text`, exactly (a Fraction: 0.1 + 0.2 is 0.3), or None."""
    found = NUMBER.findall(text)
    return Fraction(found[-1].replace(",", "")) if found else None


def numeric(completion, target):
    answer = last_number(target["answer"])
    if answer is None:
        raise ValueError(f"the answer {target['answer']!r} holds no number")
    return float(last_number(completion) == answer)


def reasoning_gym_score(completion, target):
    """reasoning_gym's verifier of the record's task. Its datasets ask for the answer in <answer>...</answer> when
    their own prompt is used: the last such span is scored, else the whole completion."""
    tagged = ANSWER_TAG.findall(completion)
    answer = (tagged[-1] if tagged else completion).strip()
    entry = {"question": target.get("question", ""), "answer": target["answer"],
             "metadata": target.get("metadata") or {}}
    return float(reasoning_gym_verifier(target.get("task"))(answer, entry))


@functools.lru_cache(maxsize=None)  # one verifier per task: building one builds its dataset's config
def reasoning_gym_verifier(task):
    if not task:
        raise ValueError("the record names no task (a \"task\" field with a reasoning_gym dataset name)")
    try:
        import reasoning_gym
    except ImportError:
        raise UserError(f"grpo_reward='reasoning_gym' needs the package reasoning-gym: {INSTALL}") from None
    try:
        return reasoning_gym.get_score_answer_fn(task)
    except (KeyError, ValueError):
        raise ValueError(f"task {task!r} is not a reasoning_gym dataset") from None


REWARDS = {"exact": exact, "numeric": numeric, "reasoning_gym": reasoning_gym_score}


def score(name, completion, target):
    """REWARDS[name](completion, target), or a UserError naming the reward and the record."""
    try:
        value = REWARDS[name](completion, target)
    except UserError:
        raise
    except Exception as e:  # the reward is the user's choice; what it raises is about this record
        raise UserError(f"grpo_reward={name!r} failed on {target.get('where', 'a record')} ({type(e).__name__}: "
                         f"{e}); fix the record or choose another grpo_reward") from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"grpo_reward={name!r} gave {value!r} on {target.get('where', 'a record')}: a reward must "
                         f"be a finite number")
    return float(value)


def check(name, targets):
    """Try the reward on every target once (its own answer as the completion): a record it cannot score is refused
    before any training, in one line."""
    for target in targets:
        score(name, target["answer"], target)
