"""A small fine-tuning task made offline from the Shakespeare corpus: who speaks these lines?

    python -m tasks.shakespeare_speakers --out data/shakespeare_speakers     # -> train.jsonl, val.jsonl

Each record is a prompt/completion pair. The prompt names the previous speaker and gives the first words of a
speech; the completion is the speaker, one of the four characters with the most speeches in each of six plays
(24 names):

    {"prompt": "After HORATIO:\\nAy, marry, is't: But to my mind, though I am native here ...\\nSpeaker:\\n",
     "completion": "HAMLET"}

The cues are the scene (who spoke before, so which play and who is on stage) and the speech itself (names,
manner of address). The metric is exact match of the greedy answer; always answering the most frequent training
speaker is the trivial baseline. Every fifth eligible speech of a play goes to val, the rest to train, so val
holds speeches the model has never been trained on, from the same scenes (val.jsonl in a shuffled order). `make
sft` tunes SmolLM2-135M-Instruct on it; the plays are also part of the from-scratch base's corpus (`make
shakespeare`), which has read them as text, without the question.
"""
import argparse
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

from tools.atomic import atomic_path
from fineweb import clean_play_markdown, shakespeare_play_paths

PLAYS = ("hamlet", "romeo-and-juliet", "othello", "macbeth", "king-lear", "the-merchant-of-venice")
N_SPEAKERS = 4  # per play: the characters with the most speeches
MIN_WORDS, MAX_WORDS = 5, 20  # speeches shorter than MIN_WORDS carry no cue; longer ones are cut to MAX_WORDS
VAL_EVERY = 5


def speeches(play_text):
    """[(speaker, words)] in order; a new act or scene resets the previous speaker (speaker None)."""
    out, speaker, lines = [], None, []
    for line in clean_play_markdown(play_text).splitlines() + ["ACT END"]:
        line = line.strip()
        heading = line.startswith(("ACT ", "SCENE ", "PROLOGUE", "EPILOGUE"))
        name = re.fullmatch(r"([A-Z][A-Z .'\-]+):", line)
        if (name or heading) and speaker:
            out.append((speaker, " ".join(lines).split()))
        if heading:
            out.append((None, []))
            speaker, lines = None, []
        elif name:
            speaker, lines = name.group(1), []
        elif speaker and line and not line.startswith("["):  # stage directions in brackets are not speech
            lines.append(line)
    return out


def records(play_text):
    """(train, val) records of one play."""
    spoken = speeches(play_text)
    main = {name for name, _ in Counter(s for s, _ in spoken if s).most_common(N_SPEAKERS)}
    train, val, eligible = [], [], 0
    for (previous, _), (speaker, words) in zip(spoken, spoken[1:]):
        if speaker not in main or previous is None or len(words) < MIN_WORDS:
            continue
        prompt = f"After {previous}:\n{' '.join(words[:MAX_WORDS])}\nSpeaker:\n"
        # the name opens a line, as speaker names do in the plays: the same tokens the base has read them as
        (val if eligible % VAL_EVERY == VAL_EVERY - 1 else train).append({"prompt": prompt, "completion": speaker})
        eligible += 1
    return train, val


def make(out_dir, plays=PLAYS):
    """Write out_dir/train.jsonl and out_dir/val.jsonl (atomically); returns their record counts."""
    paths = shakespeare_play_paths()
    train, val = [], []
    for play in plays:
        t, v = records(Path(paths[play]).read_text(encoding="utf-8"))
        train += t
        val += v
    random.Random(0).shuffle(val)  # the first N val prompts (eval_generate_limit) then span all six plays
    return write_splits(out_dir, train, val)


def write_splits(out_dir, train, val):
    """out_dir/train.jsonl and out_dir/val.jsonl, one JSON record a line, each written atomically."""
    for name, rows in (("train", train), ("val", val)):
        with atomic_path(Path(out_dir) / f"{name}.jsonl") as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return len(train), len(val)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="data/shakespeare_speakers")
    from tools.errors import report_user_errors
    args = parser.parse_args(report_user_errors(sys.argv[1:]))
    n_train, n_val = make(args.out)
    print(f"{args.out}: {n_train} train and {n_val} val records (speaker attribution, {len(PLAYS)} plays)")
