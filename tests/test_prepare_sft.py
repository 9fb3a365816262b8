"""prepare_sft.py: records -> token ids + loss mask, chat templates as transformers renders them, errors, atomicity."""
import json

import numpy as np
import pytest

import prepare_sft
from tokenization import load_tokenizer
from tokenization.chat import chat_ids, render_chat
from loaders.sft import read_examples
from tokenization.tokenizer import EOT, gpt2_encoding

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# Llama 3 Instruct's chat template, as its tokenizer_config.json ships it
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT = [{"role": "system", "content": "you answer briefly"}, {"role": "user", "content": "who wrote hamlet"},
        {"role": "assistant", "content": "shakespeare"}, {"role": "user", "content": "and macbeth"},
        {"role": "assistant", "content": "shakespeare too"}]


def write_llama3_folder(folder):
    """A word-level tokenizer.json with Llama 3's special tokens, and a tokenizer_config.json with its template."""
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    words = sorted({w for m in CHAT for w in (m["role"] + " " + m["content"]).split()})
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens(SPECIALS)
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    return folder


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_the_string_and_ids_of_transformers_apply_chat_template(tmp_path, add_generation_prompt):
    folder = write_llama3_folder(tmp_path / "llama3")
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(folder)
    messages = CHAT if not add_generation_prompt else CHAT[:-1]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert render_chat(ours, messages, add_generation_prompt) == expected
    if not add_generation_prompt:
        ids, mask = chat_ids(ours, messages)
        expected_ids = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids == list(expected_ids)
        trained = hf.decode([i for i, m in zip(ids, mask) if m])  # the two replies with their <|eot_id|>
        assert trained.split() == "shakespeare <|eot_id|> shakespeare too <|eot_id|>".split()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_completion_masks_the_completion_and_its_eos_only(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "To be, or not", "completion": " to be"}])
    prepare_sft.prepare(data, data, tmp_path / "out")
    _, [(ids, mask)] = read_examples(tmp_path / "out", "train")
    enc = gpt2_encoding()
    prompt = [EOT] + enc.encode_ordinary("To be, or not")
    assert ids.tolist() == prompt + enc.encode_ordinary(" to be") + [EOT]
    assert mask.tolist() == [0] * len(prompt) + [1] * (len(ids) - len(prompt))


def test_plain_template_masks_assistant_turns_and_their_eos(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}])
    prepare_sft.prepare(data, data, tmp_path / "out")
    _, [(ids, mask)] = read_examples(tmp_path / "out", "train")
    enc = gpt2_encoding()
    assert enc.decode(ids.tolist()) == ("<|endoftext|>System: you answer briefly\n\nUser: who wrote hamlet\n\n"
                                        "Assistant: shakespeare<|endoftext|>\n\nUser: and macbeth\n\n"
                                        "Assistant: shakespeare too<|endoftext|>\n\n")
    assert enc.decode(ids[mask].tolist()) == " shakespeare<|endoftext|> shakespeare too<|endoftext|>"


def test_too_long_examples_are_truncated_keeping_the_answer_or_dropped_and_counted(tmp_path, capsys):
    long_prompt = " ".join(["word"] * 40)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": long_prompt, "completion": " the answer"},
                                              {"prompt": "short", "completion": " yes"}])
    header = prepare_sft.prepare(data, data, tmp_path / "cut", block_size=16)
    _, examples = read_examples(tmp_path / "cut", "train")
    ids, mask = examples[0]
    enc = gpt2_encoding()
    assert len(ids) == 16 and enc.decode(ids[mask].tolist()) == " the answer<|endoftext|>"
    assert enc.decode(ids[:3].tolist()) == "<|endoftext|>word word"  # the start of the prompt stays
    assert header["splits"]["train"]["truncated"] == 1
    prepare_sft.main(["--input", str(data), "--val", str(data), "--out", str(tmp_path / "drop"), "--block_size=16",
                      "--truncation=drop"])
    assert "train: 1 examples" in capsys.readouterr().out.replace(",", "")
    assert len(read_examples(tmp_path / "drop", "train")[1]) == 1


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "completion": "b"', r"d.jsonl:2: not valid JSON"),
    ('{"text": "a"}', r"d.jsonl:2: a record needs the fields \"prompt\" and \"completion\", or \"messages\""),
    ('{"prompt": "a"}', r"d.jsonl:2: field 'completion' is missing"),
    ('{"prompt": "", "completion": "b"}', r"d.jsonl:2: field 'prompt' must be a non-empty string"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', r"d.jsonl:2: field messages\[0\].role is 'bot': use one of"),
    ('{"messages": [{"role": "user", "content": ""}]}', r"d.jsonl:2: messages\[0\]: field 'content' must be a non-empty"),
])
def test_bad_records_stop_with_file_line_and_field(tmp_path, line, message):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "completion": " ok"}, line])
    with pytest.raises(ValueError, match=message):
        prepare_sft.prepare(data, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_command_line_reports_a_bad_record_in_one_line(tmp_path):
    import subprocess
    import sys
    from conftest import subprocess_env
    from test_train import ROOT
    data = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": 3, "completion": "b"}'])
    argv = [sys.executable, "prepare_sft.py", "--input", str(data), "--val", str(data), "--out", str(tmp_path / "out")]
    done = subprocess.run(argv, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: ") and "d.jsonl:1: field 'prompt' must be a non-empty string" in done.stderr


def test_an_interrupted_preparation_leaves_nothing_behind(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}] * 3)
    real_savez, calls = np.savez, []

    def savez_then_die(*args, **kwargs):
        real_savez(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the train shard is written, the val shard too: killed before the header
            raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", savez_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_sft.prepare(data, data, tmp_path / "data" / "task")
    assert list((tmp_path / "data").iterdir()) == []  # no out folder, no temp folder


def test_an_existing_folder_is_replaced_only_when_asked_and_only_if_prepare_made_it(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}])
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="not a folder prepare_sft.py made"):
        prepare_sft.prepare(data, data, tmp_path / "mine", overwrite=True)
    prepare_sft.prepare(data, data, tmp_path / "out")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        prepare_sft.prepare(data, data, tmp_path / "out")
    prepare_sft.prepare(data, data, tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "mine", "out"]


def test_a_gguf_files_tokenizer_and_template_tokenize_the_data_and_sft_json_names_the_file(tmp_path):
    gguf = pytest.importorskip("gguf")
    from formats.gguf import convert_gguf
    from test_gguf import make_hf_llama, write_gguf
    from tokenization import load_tokenizer
    path = write_gguf(tmp_path / "tiny.gguf", make_hf_llama(tied=True), gguf.GGMLQuantizationType.F32)
    hf = transformers.AutoTokenizer.from_pretrained(convert_gguf(path, tmp_path / "converted"))
    chat = [{"role": "user", "content": "the romeo"}, {"role": "assistant", "content": "and the rest"}]
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": chat}])
    header = prepare_sft.prepare(data, data, tmp_path / "out", tokenizer=path)
    assert header["tokenizer"] == str(path) and header["chat_template"] == "checkpoint"
    assert load_tokenizer(header["tokenizer"]).name == str(path)  # what sft_eval.py and train.py load back
    _, [(ids, mask)] = read_examples(tmp_path / "out", "train")
    assert ids.tolist() == list(hf.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
    assert hf.decode(ids[mask.astype(bool)].tolist()) == "and the rest<|im_end|>"


def test_a_tokenizer_without_an_end_of_sequence_token_is_refused(tmp_path):
    folder = write_llama3_folder(tmp_path / "llama3")
    (folder / "tokenizer_config.json").unlink()  # no eos_token, and no config.json with an eos_token_id
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}])
    with pytest.raises(ValueError, match=f"--tokenizer={folder}: .* has no end-of-sequence token"):
        prepare_sft.prepare(data, data, tmp_path / "out", tokenizer=folder)
