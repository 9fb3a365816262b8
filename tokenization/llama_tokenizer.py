"""A tokenizer.json, run by Hugging Face's `tokenizers`: the Tokenizer (tokenizer.py) of LLaMA, SmolLM2 and the other
Hugging Face checkpoints, and of .gguf files.

tokenizer.json is a complete description of the text -> ids pipeline (normalizer, pre-tokenizer, BPE merges, special
tokens, the template that puts BOS in front) that the Rust `tokenizers` package executes exactly as transformers
does. What it leaves out comes from beside it, where transformers takes it from:
    tokenizer_config.json   bos_token and eos_token (the special tokens' text) and chat_template (a list of named
                            templates: the 'default' one; a chat_template.jinja file beside it wins)
    config.json             bos_token_id / eos_token_id, when tokenizer_config.json names no such token
A .gguf file holds all of it in its metadata; formats/gguf.py writes it out as the same two dicts.

    tok = HFTokenizer.from_folder("models/smollm2-135m-instruct")   # or HFTokenizer.from_gguf("model.gguf")
    ids = tok.encode("The capital of France is")                    # with BOS in front if the model was trained so
    out = model.generate(torch.tensor([ids]), 20, eos_id=tok.eos_id)
    print(tok.decode(out[0].tolist()))

Scripts call tokenizer.load_tokenizer(spec), which also follows out_dirs and adapters back to these files.
`tokenizers` is an optional dependency: only this file needs it.
"""
import json
from pathlib import Path

from tools.errors import UserError


class HFTokenizer:
    """The Tokenizer interface over a `tokenizers.Tokenizer`; name is the folder or .gguf file it was read from."""

    def __init__(self, tokenizer, name, bos_id=None, eos_id=None, chat_template=None):
        self.tokenizer, self.name, self.bos_id, self.eos_id = tokenizer, name, bos_id, eos_id
        self.chat_template = chat_template

    @property
    def vocab_size(self):
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text, add_special_tokens=True, split_special_tokens=False):
        """text -> ids; add_special_tokens applies the checkpoint's template (LLaMA: a leading BOS);
        split_special_tokens: a special token's text in `text` is spelled as ordinary text, not matched whole."""
        self.tokenizer.encode_special_tokens = split_special_tokens
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False):
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @classmethod
    def from_folder(cls, folder):
        """The tokenizer.json of a Hugging Face folder, with tokenizer_config.json and config.json beside it."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{folder}: no tokenizer.json. Hugging Face checkpoints ship one; copy it into "
                                    f"this folder (older checkpoints with only tokenizer.model need converting with "
                                    f"transformers first)")
        Tokenizer = tokenizer_class()  # the package missing is its own error
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the Rust tokenizers' own error: truncated, not JSON, or another library's format
            raise UserError(f"{folder / 'tokenizer.json'} is not a tokenizer the tokenizers package can read "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); copy the checkpoint's "
                             f"tokenizer.json again") from None
        config, model_config = (_read_json(folder / name) for name in ("tokenizer_config.json", "config.json"))
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(tokenizer, str(folder), *_bos_eos(tokenizer, config, model_config), template)

    @classmethod
    def from_gguf(cls, path):
        """The tokenizer a .gguf file describes in its metadata (formats/gguf.py turns it into a tokenizer.json)."""
        from formats.gguf import open_gguf, tokenizer_config, tokenizer_json
        reader = open_gguf(path)
        tokenizer = tokenizer_class().from_str(json.dumps(tokenizer_json(reader)))
        config = tokenizer_config(reader)
        return cls(tokenizer, str(path), *_bos_eos(tokenizer, config, {}), config.get("chat_template"))


def _read_json(path):
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); restore the file from the checkpoint it came with") from None
    if not isinstance(content, dict):
        raise UserError(f"{path}: a JSON object was expected, got {type(content).__name__}")
    return content


def _bos_eos(tokenizer, config, model_config):
    """(bos_id, eos_id): the ids of tokenizer_config's bos_token / eos_token (as transformers' tokenizer has them),
    else config.json's bos_token_id / eos_token_id (the first of a list: Llama 3 Instruct lists several)."""
    def special(kind):
        text = config.get(f"{kind}_token")
        text = text.get("content") if isinstance(text, dict) else text  # an AddedToken written as a dict
        token_id = tokenizer.token_to_id(text) if text else None
        if token_id is None:
            token_id = model_config.get(f"{kind}_token_id")
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        return token_id
    return special("bos"), special("eos")


def tokenizer_class():
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError("Hugging Face tokenizers need the `tokenizers` package: pip install tokenizers") from e
    return Tokenizer
