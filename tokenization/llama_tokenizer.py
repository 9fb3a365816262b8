"""The tokenizer that ships with a Hugging Face LLaMA checkpoint (tokenizer.json), for generation.

GPT-2 models use tiktoken (tokenizer.py). LLaMA checkpoints each bring their own tokenizer in `tokenizer.json`,
a complete description (normalizer, pre-tokenizer, BPE merges, special tokens, the BOS template) that the Rust
`tokenizers` package executes. It is an optional dependency: only this file needs it.

    tok = load_llama_tokenizer("path/to/Llama-3.2-1B")
    ids = tok.encode("The capital of France is")      # starts with BOS, as the model was trained
    out = model.generate(torch.tensor([ids]), 20, eos_id=tok.eos_id)
    print(tok.decode(out[0].tolist()))
"""
import json

from model.hf import resolve_model_dir


class LLaMATokenizer:
    """encode/decode over a `tokenizers.Tokenizer`; eos_id/bos_id from the folder's config.json when present."""

    def __init__(self, tokenizer, bos_id=None, eos_id=None, model_dir=None):
        self.tokenizer, self.bos_id, self.eos_id, self.model_dir = tokenizer, bos_id, eos_id, model_dir
        self.name = f"the tokenizer.json of {model_dir}"

    @property
    def vocab_size(self):
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text, add_special_tokens=True):
        """text -> token ids; add_special_tokens applies the checkpoint's template (for LLaMA: a leading BOS)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False):
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def load_llama_tokenizer(model_dir):
    """The tokenizer.json in `model_dir` (or the tokenizer inside a .gguf file) as an LLaMATokenizer.
    Needs `pip install tokenizers`."""
    if str(model_dir).endswith(".gguf"):
        return gguf_tokenizer(model_dir)
    model_dir = resolve_model_dir(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no tokenizer.json. LLaMA checkpoints ship one; copy it into this "
                                f"folder (older checkpoints with only tokenizer.model need converting with "
                                f"transformers first)")
    Tokenizer = tokenizer_class()
    bos_id = eos_id = None
    config = model_dir / "config.json"
    if config.is_file():
        with open(config) as f:
            hf = json.load(f)
        bos_id, eos_id = hf.get("bos_token_id"), hf.get("eos_token_id")
        if isinstance(eos_id, list):  # Llama 3 instruct lists several; generate() stops on one
            eos_id = eos_id[0] if eos_id else None
    return LLaMATokenizer(Tokenizer.from_file(str(path)), bos_id, eos_id, str(model_dir))


def tokenizer_class():
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError("LLaMA tokenizers need the `tokenizers` package: pip install tokenizers") from e
    return Tokenizer


def gguf_tokenizer(path):
    """The tokenizer a .gguf file describes in its metadata (model/gguf.py builds its tokenizer.json)."""
    from formats.gguf import hf_config, open_gguf, tokenizer_json
    reader = open_gguf(path)
    config = hf_config(reader)
    tokenizer = tokenizer_class().from_str(json.dumps(tokenizer_json(reader)))
    return LLaMATokenizer(tokenizer, config["bos_token_id"], config["eos_token_id"], str(path))
