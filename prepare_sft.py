"""Tokenize task data (JSONL) into the shards of `objective = 'sft'`: token ids plus a parallel loss mask.

    python prepare_sft.py --input train.jsonl --val val.jsonl --out data/my-task [--tokenizer <HF folder>]

One record a line, in either of the two formats Hugging Face TRL uses:
    {"prompt": "...", "completion": "..."}                        prompt text, then the completion and EOS
    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}   a chat, ending with a reply
or preference pairs for `objective = 'dpo'`, as TRL takes them (a file holds one kind):
    {"prompt": "...", "chosen": "...", "rejected": "..."}        two examples with the same prompt tokens
    {"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages]}   conversational
or prompts with a reference answer for `objective = 'grpo'` (objectives/rewards.py scores completions against it):
    {"prompt": "...", "answer": "..."}                            the prompt text; "answer" a string or a number
    {"messages": [... ending with a user message], "answer": "..."}   rendered up to the generation prompt
                                                                  ("prompt": [messages], as TRL, the same)
    optional "task" (a reasoning_gym dataset name) and "metadata" (its entry's metadata), for its verifier
--tokenizer names the model whose tokenizer to use (tokenization.load_tokenizer: a Hugging Face folder, a training
out_dir, an adapter folder or a .gguf file; default GPT-2's); sft.json records its name. Chats are rendered with the
checkpoint's own chat template (chat.py), else with the plain one. The mask is 1 on
the tokens the model learns to produce (completion / assistant replies and the EOS that ends them), 0 on prompt,
system, user and template tokens (in a pair, 1 on the final answer only). An example is at most --block_size
tokens; a longer one is cut (--truncation=truncate: the start of the prompt's budget and the whole answer where it
fits) or skipped (drop). The two examples of a pair are cut alike (room for the longer answer) or dropped together.

Output (all of it built in a temp folder, then moved into place: an interrupted run leaves nothing; the next run
removes the temp folder a killed one left):
    sft.json                  header: tokenizer (its name and tokenizer_fingerprint), chat template, eos/pad id,
                              block_size, counts and shard names per split, data_id (a hash of the shards)
    {split}_{k:06d}.npz       tokens (N,) uint16|uint32, mask (N,) uint8, offsets (n_examples + 1,) int64
--overwrite replaces what an earlier prepare_sft.py wrote (sft.json and its shards) and nothing else in the folder;
sft.json goes first and comes back last, so a folder caught half-replaced has none and is never read.
Example i of a shard is tokens[offsets[i]:offsets[i + 1]]; examples keep the order of the input file. A pair is
examples 2j (chosen) and 2j + 1 (rejected) of one shard; sft.json's "kind" is 'preference', else 'sft'.
A prompt folder (kind 'prompt') holds the prompts' tokens (mask 0) and, in each shard, answers (n_examples,): one
JSON string per prompt, {"answer", "where" (file:line), "question", "task", "metadata"}; a prompt longer than
--block_size keeps its last tokens (the question and the generation prompt), or is dropped.
"""
import argparse
import errno
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

from loaders.records import read_records
from loaders.sft import HEADER, SHARD_NAME
from tokenization import load_tokenizer
from tokenization.chat import chat_ids, generation_prompt_ids
from tokenization.tokenizer import tokenizer_fingerprint
from tools.atomic import (current_umask, lock_file, remove_stale_temp_folders, rename_folder, temp_folder,
                          unlock_file)
from tools.errors import UserError

FORMAT = "nanolora-sft-1"
ITEMS = {"sft": "examples", "preference": "pairs", "prompt": "prompts"}  # what a folder of each kind counts
REPLACING = ".sft.json.replacing"  # the old header while --overwrite swaps the files: the folder is still ours


# ---- records -> (ids, mask) ----------------------------------------------------------------------------------
def example_ids(tok, record):
    """(ids, mask) of one record: prompt/completion as start + prompt + completion + EOS, chats via chat_ids; a GRPO
    prompt as the model sees it before its completion (a chat up to the template's generation prompt), mask 0."""
    if record[0] == "prompt":
        ids = generation_prompt_ids(tok, record[1]) if isinstance(record[1], list) else tok.encode(record[1])
        return ids, [0] * len(ids)
    if record[0] == "messages":
        return chat_ids(tok, record[1], record[2])
    _, prompt, completion = record
    prompt_ids = tok.encode(prompt)  # opened as a document is in pretraining (GPT-2: <|endoftext|>, LLaMA: BOS)
    answer_ids = tok.encode(completion, add_special_tokens=False) + [tok.eos_id]
    return prompt_ids + answer_ids, [0] * len(prompt_ids) + [1] * len(answer_ids)


def pair_ids(tok, record):
    """[(ids, mask) of chosen, (ids, mask) of rejected]: the same prompt tokens, the mask on the final answer only
    (a conversational prompt's own assistant turns are context, not the answer being compared)."""
    if record[0] == "preference":
        _, prompt, chosen, rejected = record
        return [example_ids(tok, ("prompt_completion", prompt, answer)) for answer in (chosen, rejected)]
    pair = []
    for messages in record[1:]:
        ids, mask = chat_ids(tok, messages)
        start = answer_start(mask)
        pair.append((ids, [0] * start + mask[start:]))
    return pair


def answer_start(mask):
    """The index of the first token of the mask's last run of 1s (the answer); len(mask) when there is none."""
    start = max((i for i, m in enumerate(mask) if m), default=len(mask))
    while start > 0 and mask[start - 1]:
        start -= 1
    return start


def fit(ids, mask, block_size, truncation, answer_len=None):
    """(ids, mask, was_cut) within block_size tokens, or None to drop. The answer is the last run of 1s in the mask,
    the prompt everything before it: truncate keeps the prompt's first tokens that leave room for the whole answer
    (at least one), and cuts the answer's end only when the answer alone does not fit. answer_len: room to leave
    instead (the longer answer of a pair, so that chosen and rejected keep the same prompt tokens)."""
    if len(ids) <= block_size and answer_len is None:
        return ids, mask, False
    if truncation == "drop":
        return None
    start = answer_start(mask)
    budget = max(1, block_size - (answer_len or len(ids) - start))
    keep = list(range(min(budget, start))) + list(range(start, len(ids)))[:block_size - min(budget, start)]
    return [ids[i] for i in keep], [mask[i] for i in keep], len(keep) < len(ids)


def fit_pair(pair, block_size, truncation):
    """fit() for chosen and rejected together: both kept or both dropped, their prompt cut alike."""
    if max(len(ids) for ids, _ in pair) <= block_size:
        return pair, False
    if truncation == "drop":
        return None
    answer_len = max(len(ids) - answer_start(mask) for ids, mask in pair)
    fitted = [fit(ids, mask, block_size, truncation, answer_len) for ids, mask in pair]
    return [(ids, mask) for ids, mask, _ in fitted], True


def tokenize_split(path, tok, block_size, truncation):
    """All examples of one JSONL file as lists, plus counts for the header."""
    examples, counts = [], {"examples": 0, "truncated": 0, "dropped": 0, "prompt_completion": 0, "messages": 0,
                            "preference": 0, "preference_messages": 0, "prompt": 0}
    kind = None  # 'sft', 'preference' or 'prompt': one file holds one kind
    for where, record in read_records(path):
        record_kind = ("preference" if record[0].startswith("preference") else "prompt" if record[0] == "prompt"
                       else "sft")
        if kind not in (None, record_kind):
            raise UserError(f"{where}: a {record_kind} record in a file of {kind} records; a file holds "
                             f"prompt/completion or messages records, preference pairs, or prompts with answers: one "
                             f"kind")
        kind = record_kind
        counts[record[0]] += 1
        try:
            unit = pair_ids(tok, record) if kind == "preference" else [example_ids(tok, record)]
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
        if kind == "prompt":  # nothing is trained on: the completions are sampled in training
            ids = unit[0][0]
            if len(ids) > block_size:  # a long prompt keeps its end: the question and the generation prompt
                counts["truncated" if truncation == "truncate" else "dropped"] += 1
                if truncation == "drop":
                    continue
            examples.append((ids[-block_size:], [0] * min(len(ids), block_size), json.dumps(record[2])))
            continue
        if any(not any(mask) for _, mask in unit):
            raise UserError(f"{where}: nothing to train on: the chat template of {tok.name} renders no assistant "
                             f"text for this record; use a template that writes the assistant's content")
        if kind == "preference" and unit[0][0] == unit[1][0]:
            raise UserError(f"{where}: 'chosen' and 'rejected' give the same tokens; a preference pair needs two "
                             f"different answers")
        fitted = fit_pair(unit, block_size, truncation)
        if fitted is None:
            counts["dropped"] += 1
            continue
        unit, was_cut = fitted
        counts["truncated"] += was_cut
        examples += unit  # a pair: chosen then rejected, next to each other
    if not examples:
        raise UserError(f"{path}: no examples left (empty file, or every example dropped as longer than "
                         f"--block_size={block_size})")
    counts["kind"] = kind
    counts["examples"] = len(examples) // 2 if kind == "preference" else len(examples)  # pairs, else examples
    counts["tokens"] = sum(len(ex[0]) for ex in examples)
    counts["trained_tokens"] = sum(sum(ex[1]) for ex in examples)
    return examples, counts


def write_split(folder, split, examples, dtype, shard_size, group=1, digest=None):
    """Whole examples into shards of about shard_size tokens, `group` at a time (2: a preference pair is never
    split over two shards); returns the shard file names. digest (a hashlib object) is fed every array written.
    An example (ids, mask, target) of a prompt folder adds its target (a JSON string) to the shard's answers."""
    names, start = [], 0
    while start < len(examples):
        end, n = start, 0
        while end < len(examples) and (n == 0 or n + sum(len(ex[0]) for ex in examples[end:end + group]) <= shard_size):
            n += sum(len(ex[0]) for ex in examples[end:end + group])
            end += group
        chunk = examples[start:end]
        lengths = np.array([len(ex[0]) for ex in chunk], dtype=np.int64)
        name = f"{split}_{len(names):06d}.npz"
        arrays = {"tokens": np.concatenate([np.asarray(ex[0], dtype=dtype) for ex in chunk]),
                  "mask": np.concatenate([np.asarray(ex[1], dtype=np.uint8) for ex in chunk]),
                  "offsets": np.concatenate([[0], np.cumsum(lengths)])}
        if len(chunk[0]) == 3:  # a prompt folder: the targets, as fixed-width unicode (no pickle to load them)
            arrays["answers"] = np.array([ex[2] for ex in chunk], dtype=str)
        np.savez(folder / name, **arrays)
        for array in arrays.values() if digest is not None else ():
            digest.update(np.ascontiguousarray(array).tobytes())
        names.append(name)
        start = end
    return names


def prepare(train_path, val_path, out, tokenizer=None, block_size=1024, truncation="truncate", shard_size=10_000_000,
            overwrite=False):
    """Write the shards and sft.json of both splits into `out`; returns the header dict."""
    if truncation not in ("truncate", "drop"):
        raise UserError(f"--truncation={truncation!r}: use 'truncate' or 'drop'")
    if block_size < 2:
        raise UserError(f"--block_size={block_size}: an example needs at least 2 tokens")
    if shard_size < 1:
        raise UserError(f"--shard_size={shard_size}: a shard holds at least 1 token (whole examples: a longer one "
                         f"still fits)")
    out = Path(out)
    ours = out.is_dir() and ((out / HEADER).is_file() or (out / REPLACING).is_file())
    if out.exists() and not (overwrite and ours):
        raise FileExistsError(f"{out} exists; pass --overwrite to replace a folder prepare_sft.py made, or choose "
                              f"another --out" if ours else
                              f"{out} exists and is not a folder prepare_sft.py made; choose another --out")
    for name in remove_stale_temp_folders(out):
        print(f"removed {out.parent / name}, the temp folder of a prepare_sft.py that was killed")
    tok = load_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise UserError(f"--tokenizer={tokenizer}: {tok.name} has no end-of-sequence token (no eos_token in "
                         f"tokenizer_config.json, no eos_token_id in config.json); fine-tuning needs one to end "
                         f"every answer: add it there")
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    header = {"format": FORMAT, "tokenizer": tok.name, "tokenizer_fingerprint": tokenizer_fingerprint(tok),
              "chat_template": "checkpoint" if tok.chat_template else "plain", "eos_id": tok.eos_id,
              "pad_id": tok.eos_id, "vocab_size": tok.vocab_size, "block_size": block_size, "truncation": truncation,
              "splits": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_file(out / ".lock") if ours else None  # another --overwrite of this folder waits for none
    if ours and lock is None:
        raise UserError(f"{out} is being replaced by another prepare_sft.py right now; wait for it to end")
    try:
        with temp_folder(out) as tmp:
            tmp, digest = Path(tmp), hashlib.sha256()
            for split, path in (("train", train_path), ("val", val_path)):
                examples, counts = tokenize_split(path, tok, block_size, truncation)
                header.setdefault("kind", counts["kind"])
                if counts.pop("kind") != header["kind"]:
                    raise UserError(f"{path} holds other records than {train_path} ({header['kind']}): give both "
                                     f"splits in one format")
                group = 2 if header["kind"] == "preference" else 1
                counts["shards"] = write_split(tmp, split, examples, dtype, shard_size, group, digest)
                header["splits"][split] = {"source": str(path), **counts}
            header["data_id"] = digest.hexdigest()[:16]
            (tmp / HEADER).write_text(json.dumps(header, indent=2) + "\n")
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes the folder owner-only
            if ours:
                replace_files(tmp, out, header)
            else:
                try:
                    rename_folder(tmp, out)
                except OSError:
                    if out.exists():
                        raise FileExistsError(f"{out} was made by another program while this prepare_sft.py ran; "
                                              f"choose another --out") from None
                    raise
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) and not e.filename and str(out) not in str(e):
            # numpy's write names no file
            raise OSError(e.errno, f"cannot write {out}: {e.strerror}") from None
        raise
    finally:
        if lock is not None:
            unlock_file(out / ".lock", lock)
    return header


def replace_files(tmp, out, header):
    """--overwrite: move the new files from tmp into `out`, removing the old sft.json and shards first; any other
    file of `out` stays. sft.json is set aside first and the new one moved in last: until then the folder has
    none, so nothing reads a mix of old and new shards, and a rerun knows the folder for one it made."""
    if (out / HEADER).is_file():
        os.replace(out / HEADER, out / REPLACING)
    new = {name for split in header["splits"].values() for name in split["shards"]}
    for path in out.iterdir():
        if SHARD_NAME.fullmatch(path.name) and path.name not in new and path.is_file():
            path.unlink()
    for name in sorted(new):
        os.replace(tmp / name, out / name)
    os.replace(tmp / HEADER, out / HEADER)
    (out / REPLACING).unlink(missing_ok=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="training records, JSONL")
    p.add_argument("--val", required=True, help="validation records, JSONL (val loss and exact-match in training)")
    p.add_argument("--out", required=True, help="the folder to write (must not exist, unless --overwrite)")
    p.add_argument("--tokenizer", help="the model whose tokenizer to use: a Hugging Face folder with tokenizer.json "
                   "(+ tokenizer_config.json for its chat template), a training out_dir, an adapter folder or a .gguf "
                   "file; default: GPT-2's tokenizer and the plain template")
    p.add_argument("--block_size", type=int, default=1024, help="the most tokens an example may have")
    p.add_argument("--truncation", choices=("truncate", "drop"), default="truncate")
    p.add_argument("--shard_size", type=int, default=10_000_000, help="tokens per shard file (whole examples)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if an earlier prepare_sft.py made it")
    args = p.parse_args(argv)
    header = prepare(args.input, args.val, args.out, args.tokenizer, args.block_size, args.truncation,
                     args.shard_size, args.overwrite)
    for split, c in header["splits"].items():
        print(f"{split}: {c['examples']:,} {ITEMS[header['kind']]}, {c['tokens']:,} tokens "
              f"({c['trained_tokens']:,} trained on); "
              f"{c['truncated']:,} truncated, {c['dropped']:,} dropped (longer than {args.block_size} tokens)")
    print(f"wrote {args.out} (tokenizer {header['tokenizer']}, {header['chat_template']} chat template)")


if __name__ == "__main__":
    from tools.errors import report_user_errors
    main(report_user_errors(sys.argv[1:]))
