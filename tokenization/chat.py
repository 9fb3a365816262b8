"""Chats as text and token ids, with the model's own chat template, rendered as Hugging Face renders it.

A Hugging Face checkpoint that was trained on chats ships its template in tokenizer_config.json ("chat_template",
or a chat_template.jinja file beside it), a .gguf file in its metadata; the tokenizer brings it as
tok.chat_template (tokenizer.py). It is a Jinja program over `messages` (a list of {"role", "content"}),
`add_generation_prompt` and the special tokens (`bos_token`, `eos_token`: the text of tok.bos_id, tok.eos_id).
transformers' apply_chat_template runs it in a sandboxed Jinja environment with trim_blocks and lstrip_blocks; so do
we, with the same helpers (raise_exception, strftime_now, a tojson that keeps non-ASCII), so the same chat gives the
same string. The special tokens in the rendered string become their ids when it is encoded.

A model without a template (GPT-2, our own checkpoints) gets PLAIN_CHAT_TEMPLATE:

    <bos>System: {system}\\n\\nUser: {user}\\n\\nAssistant: {reply}<eos>\\n\\nUser: ...

Which tokens are the assistant's (trained on) is found by rendering prefixes: the text a reply adds after the
generation prompt of the chat before it, up to and including the end-of-turn token (the tokenizer's eos token;
appended when the template ends turns without one), so that generation learns to stop.
"""
import functools
import json
from datetime import datetime
from tools.errors import UserError

ROLES = ("system", "user", "assistant")
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def special_tokens(tok):
    """(bos_token, eos_token): the text the template writes for the tokenizer's BOS ('' when it has none) and EOS."""
    if tok.eos_id is None:
        raise UserError(f"{tok.name}: the tokenizer has no end-of-sequence token (no eos_token in "
                         f"tokenizer_config.json, no eos_token_id in config.json); a chat needs one to end each reply")
    return tok.decode([tok.bos_id]) if tok.bos_id is not None else "", tok.decode([tok.eos_id])


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
    """The chat as one string, as tokenizer.apply_chat_template(messages, tokenize=False) renders it. A template
    that does not compile or that fails (its own raise_exception, the sandbox refusing an unsafe access, any error
    in its code) is a UserError naming the template's checkpoint."""
    import jinja2
    bos_token, eos_token = special_tokens(tok)
    which = f"the chat template of {tok.name}" if tok.chat_template else "the plain chat template"
    try:
        template = compile_template(tok.chat_template or PLAIN_CHAT_TEMPLATE)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{which} is not valid Jinja (line {e.lineno}: {e.message}); fix its chat_template") from None
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token, eos_token=eos_token)
    except Exception as e:  # the template is the checkpoint's code: whatever it raises is about it
        kind = "refuses this chat" if type(e) is jinja2.TemplateError else f"fails ({type(e).__name__})"
        raise UserError(f"{which} {kind}: {e}") from None


def chat_pieces(tok, messages, train_from=0):
    """[(text, reply, trained)]: the rendered chat cut into pieces; reply pieces are assistant replies with their
    end-of-turn token, trained those of the messages from index train_from on. Concatenated, the texts are exactly
    render_chat(tok, messages)."""
    pieces, done, eos_token = [], "", special_tokens(tok)[1]
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_chat(tok, messages[:i], add_generation_prompt=True)
        full = render_chat(tok, messages[:i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise UserError("the chat template does not render a chat as the start of its continuation, so the "
                             "assistant's tokens cannot be found; use a template without that property")
        reply = full[len(prompt):]
        end = reply.rfind(eos_token) + len(eos_token) if eos_token in reply else len(reply)
        pieces += [(prompt[len(done):], False, False), (reply[:end], True, i >= train_from),
                   (reply[end:], False, False)]
        done = full
    pieces.append((render_chat(tok, messages)[len(done):], False, False))
    return [piece for piece in pieces if piece[0]]


def chat_ids(tok, messages, train_from=0):
    """(ids, mask): the chat's token ids and 1 on the assistant's tokens (of the messages from index train_from
    on), 0 elsewhere. Each piece is tokenized on its own: its ends are template text, so the cuts fall where one
    token ends and the next begins."""
    ids, mask, eos_token = [], [], special_tokens(tok)[1]
    for text, reply, trained in chat_pieces(tok, messages, train_from):
        piece = tok.encode(text, add_special_tokens=False)
        if reply and not text.endswith(eos_token):
            piece = piece + [tok.eos_id]  # the template ends turns without eos: add it, generation must stop
        ids += piece
        mask += [int(trained)] * len(piece)
    return ids, mask


def generation_prompt_ids(tok, messages):
    """Token ids of the chat followed by the template's generation prompt: what sample.py --chat feeds the model."""
    return tok.encode(render_chat(tok, messages, add_generation_prompt=True), add_special_tokens=False)
