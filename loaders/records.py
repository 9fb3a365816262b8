"""The JSONL records prepare_sft.py reads, checked field by field: one record a line, in the formats TRL uses.

    {"prompt": "...", "completion": "..."}                          -> ('prompt_completion', prompt, completion)
    {"messages": [...ending with an assistant reply]}               -> ('messages', messages, 0)
    {"prompt": [messages], "completion": [assistant messages]}      -> ('messages', messages, len(prompt))
    {"prompt": ..., "chosen": ..., "rejected": ...}                 -> ('preference' | 'preference_messages', ...)
    {"prompt" or "messages": ..., "answer": ...}                    -> ('prompt', prompt, target)  (objective='grpo')

A record with the fields of two formats is refused, not guessed. Every refusal is one line naming the file, the line
and the field (tools/errors.py).
"""
import json

from tokenization.chat import ROLES
from tools.errors import UserError


def _text_field(record, key, where):
    value = record.get(key)
    if key not in record:
        raise UserError(f"{where}: field {key!r} is missing")
    if not isinstance(value, str) or not value.strip():
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise UserError(f"{where}: field {key!r} must be a non-empty string, got {shown}")
    return value


def check_messages(messages, where, field="messages"):
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: field {field!r} must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        name = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise UserError(f"{where}: field {name!r} must be an object with role and content")
        if message.get("role") not in ROLES:
            raise UserError(f"{where}: field {name}.role is {message.get('role')!r}: use one of {', '.join(ROLES)}")
        _text_field(message, "content", f"{where}: {name}")
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: field {field!r} must end with an assistant message (the answer to learn)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_records(path):
    """Yield (where, record) for every non-blank line; record is ('prompt_completion', prompt, completion),
    ('messages', messages, train_from) or a preference pair. Stops at the first bad line with a UserError naming
    file, line and field."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            if b"\0" in raw:
                raise UserError(f"{where}: a binary file (NUL bytes), not JSONL text; the input is one JSON record "
                                 f"a line, in UTF-8")
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); the "
                                 f"input is JSONL, one JSON record a line, in UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
            yield where, parse_record(record, where)


def parse_record(record, where):
    """One record as read_records yields it; a record with the fields of two formats is refused, not guessed."""
    if "answer" in record:
        return prompt_record(record, where)
    formats = [name for name, keys in (("messages", ("messages",)), ("prompt/completion", ("completion",)),
                                       ("preference", ("chosen", "rejected"))) if any(k in record for k in keys)]
    if len(formats) > 1:
        raise UserError(f"{where}: the record has the fields of {' and '.join(formats)} records; a record is one "
                         f"kind: keep the fields of one")
    if "chosen" in record or "rejected" in record:
        return preference_record(record, where)
    if "messages" in record:
        if "prompt" in record:
            raise UserError(f"{where}: the record has \"messages\" and \"prompt\"; a chat record has messages only")
        return ("messages", check_messages(record["messages"], where), 0)
    if "prompt" in record or "completion" in record:
        if isinstance(record.get("prompt"), list):  # TRL's conversational prompt/completion: train on the completion
            completion = record.get("completion")
            if "completion" not in record:
                raise UserError(f"{where}: field 'completion' is missing")
            if not isinstance(completion, list):
                raise UserError(f"{where}: field 'completion' must be a list of assistant messages when 'prompt' is a "
                                 f"list of messages (TRL's conversational format), got {type(completion).__name__}")
            prompt = check_messages(record["prompt"] + [{"role": "assistant", "content": "-"}], where, "prompt")[:-1]
            answer = check_messages(completion, where, "completion")
            return ("messages", prompt + answer, len(prompt))
        return ("prompt_completion", _text_field(record, "prompt", where), _text_field(record, "completion", where))
    raise UserError(f"{where}: a record needs the fields \"prompt\" and \"completion\", or \"messages\" "
                     f"(found {', '.join(map(repr, record)) or 'none'})")


def preference_record(record, where):
    """('preference', prompt, chosen, rejected) of a DPO pair, as TRL takes it: three strings, or the conversational
    form where prompt is a list of messages and chosen / rejected are lists of assistant messages (the answers)."""
    if "prompt" not in record:
        raise UserError(f"{where}: field 'prompt' is missing (a preference pair needs prompt, chosen and rejected)")
    if isinstance(record["prompt"], list):
        prompt = check_messages(record["prompt"] + [{"role": "assistant", "content": "-"}], where, "prompt")[:-1]
        answers = []
        for key in ("chosen", "rejected"):
            if key not in record:
                raise UserError(f"{where}: field {key!r} is missing")
            answer = check_messages(record[key], where, key)
            if any(m["role"] != "assistant" for m in answer):
                raise UserError(f"{where}: field {key!r} must hold assistant messages only (the answer)")
            answers.append(answer)
        if answers[0] == answers[1]:
            raise UserError(f"{where}: 'chosen' and 'rejected' are the same answer; a preference pair needs two "
                             f"different ones (drop the record)")
        return ("preference_messages", *(prompt + answer for answer in answers))
    prompt, chosen, rejected = (_text_field(record, key, where) for key in ("prompt", "chosen", "rejected"))
    if chosen == rejected:
        raise UserError(f"{where}: 'chosen' and 'rejected' are the same answer; a preference pair needs two "
                         f"different ones (drop the record)")
    return ("preference", prompt, chosen, rejected)


def prompt_record(record, where):
    """('prompt', prompt text or messages, target) of a GRPO prompt: the target is what a reward reads."""
    other = [k for k in ("completion", "chosen", "rejected") if k in record]
    if other:
        raise UserError(f"{where}: the record has \"answer\" and {other[0]!r}; a prompt record (objective='grpo') "
                         f"has a prompt or messages and an answer: keep the fields of one kind")
    if ("prompt" in record) == ("messages" in record):
        raise UserError(f"{where}: a record with \"answer\" needs a \"prompt\" string or \"messages\", one of them")
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
        raise UserError(f"{where}: field 'answer' must be a non-empty string or a number, got {answer!r:.80}")
    target = {"answer": str(answer), "where": where}
    for key, kind in (("task", str), ("metadata", dict)):
        if key in record:
            if not isinstance(record[key], kind):
                raise UserError(f"{where}: field {key!r} must be a{'n object' if kind is dict else ' string'}")
            target[key] = record[key]
    messages = record.get("messages", record["prompt"] if isinstance(record.get("prompt"), list) else None)
    if messages is not None:  # {"messages": [...]}, or TRL's conversational {"prompt": [...]}
        field = "messages" if "messages" in record else "prompt"
        if not isinstance(messages, list) or not messages:
            check_messages(messages, where, field)  # refuses it, naming the field
        if isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            raise UserError(f"{where}: field {field!r} of a prompt record must end with the user's question, not an "
                             f"assistant reply (the model writes that)")
        messages = check_messages(messages + [{"role": "assistant", "content": "-"}], where, field)[:-1]
        target["question"] = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        return ("prompt", messages, target)
    target["question"] = _text_field(record, "prompt", where)
    return ("prompt", target["question"], target)
