"""Preference pairs made offline from the Shakespeare corpus: which continuation belongs to this speech?

    python -m tasks.shakespeare_pairs --out data/shakespeare_pairs     # -> train.jsonl, val.jsonl

Each record is a DPO pair. The prompt is the speaker and the opening words of a speech; the chosen answer is the
speech's true continuation; the rejected answer is the same stretch of another speech of the same play, drawn at
random (fluent Shakespeare, but not what this speaker says next):

    {"prompt": "HAMLET:\\nO, that this too too solid flesh would melt Thaw and resolve itself",
     "chosen": " into a dew! Or that the Everlasting had not fix'd His canon", "rejected": " ..."}

Both answers have the same number of words, so length tells nothing apart. Every fifth eligible speech of a play
goes to val (its rejected answer from val speeches too), the rest to train: val pairs are speeches the tuning has
never seen. Before tuning the policy is its own reference, so the held-out reward accuracy starts at 0.5.
"""
import argparse
import random
import sys
from pathlib import Path

from fineweb import shakespeare_play_paths
from tasks.shakespeare_speakers import PLAYS, speeches, write_splits

PROMPT_WORDS, ANSWER_WORDS = 12, 10
VAL_EVERY = 5


def records(play_text, rng):
    """(train, val) pairs of one play."""
    long_enough = [(s, w) for s, w in speeches(play_text) if s and len(w) >= PROMPT_WORDS + ANSWER_WORDS]
    splits = {"train": [], "val": []}
    for i, speech in enumerate(long_enough):
        splits["val" if i % VAL_EVERY == VAL_EVERY - 1 else "train"].append(speech)
    out = {}
    for split, speeches_of_split in splits.items():
        out[split] = []
        for i, (speaker, words) in enumerate(speeches_of_split):
            answer = words[PROMPT_WORDS:PROMPT_WORDS + ANSWER_WORDS]  # never a pair of two equal answers
            j = rng.choice([k for k in range(len(speeches_of_split))
                            if k != i and speeches_of_split[k][1][PROMPT_WORDS:PROMPT_WORDS + ANSWER_WORDS] != answer])
            other = speeches_of_split[j][1]
            out[split].append({
                "prompt": f"{speaker}:\n{' '.join(words[:PROMPT_WORDS])}",
                "chosen": " " + " ".join(words[PROMPT_WORDS:PROMPT_WORDS + ANSWER_WORDS]),
                "rejected": " " + " ".join(other[PROMPT_WORDS:PROMPT_WORDS + ANSWER_WORDS])})
    return out["train"], out["val"]


def make(out_dir, plays=PLAYS, seed=0):
    """Write out_dir/train.jsonl and out_dir/val.jsonl (atomically); returns their record counts."""
    paths, rng = shakespeare_play_paths(), random.Random(seed)
    train, val = [], []
    for play in plays:
        t, v = records(Path(paths[play]).read_text(encoding="utf-8"), rng)
        train += t
        val += v
    rng.shuffle(train)
    rng.shuffle(val)  # a capped evaluation then spans all plays
    return write_splits(out_dir, train, val)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/shakespeare_pairs")
    from tools.errors import report_user_errors
    args = parser.parse_args(report_user_errors(sys.argv[1:]))
    n_train, n_val = make(args.out)
    print(f"{args.out}: {n_train} train and {n_val} val preference pairs ({len(PLAYS)} plays)")
