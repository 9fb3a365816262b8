"""Chats as text and token ids, with the model's own chat template, rendered as Hugging Face renders it.

A Hugging Face checkpoint that was trained on chats ships its template in tokenizer_config.json ("chat_template",
or a chat_template.jinja file beside it): a Jinja program over `messages` (a list of {"role", "content"}),
`add_generation_prompt` and the special tokens (`bos_token`, `eos_token`, ...). transformers' apply_chat_template
runs it in a sandboxed Jinja environment with trim_blocks and lstrip_blocks; so do we, with the same helpers
(raise_exception, strftime_now, a tojson that keeps non-ASCII), so the same chat gives the same string.

A model without a template (GPT-2, our own checkpoints) gets PLAIN_CHAT_TEMPLATE:

    <bos>System: {system}\\n\\nUser: {user}\\n\\nAssistant: {reply}<eos>\\n\\nUser: ...

Which tokens are the assistant's (trained on) is found by rendering prefixes: the text a reply adds after the
generation prompt of the chat before it, up to and including the end-of-turn token (the tokenizer's eos_token;
appended when the template ends turns without one), so that generation learns to stop.
"""
import functools
import json
from dataclasses import dataclass
from datetime import datetime

ROLES = ("system", "user", "assistant")
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass
class TextTokenizer:
    """What SFT needs from a tokenizer. encode(text): ids, special-token strings in text become their ids (as in a
    rendered template); start_ids: what opens a document (GPT-2: <|endoftext|>, LLaMA: BOS, as in pretraining)."""
    name: str  # 'gpt2', or the Hugging Face folder
    encode: object
    decode: object
    start_ids: list
    eos_id: int
    bos_token: str
    eos_token: str
    vocab_size: int
    chat_template: str | None  # None: PLAIN_CHAT_TEMPLATE


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value  # tokenizer_config may store AddedToken dicts


def load_text_tokenizer(folder=None):
    """GPT-2's tokenizer (folder None), or the tokenizer.json + tokenizer_config.json of a Hugging Face folder."""
    if folder is None:
        from tokenization.tokenizer import EOT, N_VOCAB, gpt2_encoding
        enc = gpt2_encoding()
        return TextTokenizer("gpt2", lambda text: enc.encode(text, allowed_special="all"),
                             lambda ids: enc.decode([t for t in ids if t < N_VOCAB]), [EOT], EOT,
                             "<|endoftext|>", "<|endoftext|>", N_VOCAB, None)
    from model import resolve_model_dir
    from tokenization.llama_tokenizer import load_llama_tokenizer
    folder = resolve_model_dir(folder)
    tok = load_llama_tokenizer(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    eos_token = _token_text(config.get("eos_token")) or (tok.tokenizer.id_to_token(tok.eos_id)
                                                         if tok.eos_id is not None else None)
    eos_id = tok.tokenizer.token_to_id(eos_token) if eos_token else None
    if eos_id is None:
        raise ValueError(f"{folder}: no eos_token in tokenizer_config.json or config.json that tokenizer.json "
                         f"knows; fine-tuning needs one to end every answer")
    bos_token = _token_text(config.get("bos_token")) or ""
    return TextTokenizer(str(folder), lambda text: tok.encode(text, add_special_tokens=False),
                         lambda ids: tok.decode(ids), tok.encode("", add_special_tokens=True), eos_id,
                         bos_token, eos_token, tok.vocab_size, template)


@functools.lru_cache(maxsize=4)
def compile_template(source):
    """A Jinja template as transformers compiles chat templates (sandboxed, trim_blocks, lstrip_blocks)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


def render_chat(tok, messages, add_generation_prompt=False):
    """The chat as one string, as tokenizer.apply_chat_template(messages, tokenize=False) renders it."""
    template = compile_template(tok.chat_template or PLAIN_CHAT_TEMPLATE)
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                           bos_token=tok.bos_token, eos_token=tok.eos_token)


def chat_pieces(tok, messages):
    """[(text, trained)]: the rendered chat cut into pieces; trained pieces are assistant replies with their
    end-of-turn token. Concatenated, the texts are exactly render_chat(tok, messages)."""
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tok, messages[:i], add_generation_prompt=True)
        full = render_chat(tok, messages[:i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the chat template does not render a chat as the start of its continuation, so the "
                             "assistant's tokens cannot be found; use a template without that property")
        reply = full[len(prompt):]
        end = reply.rfind(tok.eos_token) + len(tok.eos_token) if tok.eos_token in reply else len(reply)
        pieces += [(prompt[len(done):], False), (reply[:end], True), (reply[end:], False)]
        done = full
    pieces.append((render_chat(tok, messages)[len(done):], False))
    return [(text, trained) for text, trained in pieces if text]


def chat_ids(tok, messages):
    """(ids, mask): the chat's token ids and 1 on the assistant's tokens, 0 elsewhere. Each piece is tokenized on
    its own: its ends are template text, so the cuts fall where one token ends and the next begins."""
    ids, mask = [], []
    for text, trained in chat_pieces(tok, messages):
        piece = tok.encode(text)
        if trained and not text.endswith(tok.eos_token):
            piece = piece + [tok.eos_id]  # the template ends turns without eos: add it, generation must stop
        ids += piece
        mask += [int(trained)] * len(piece)
    return ids, mask


def generation_prompt_ids(tok, messages):
    """Token ids of the chat followed by the template's generation prompt: what sample.py --chat feeds the model."""
    return tok.encode(render_chat(tok, messages, add_generation_prompt=True))

