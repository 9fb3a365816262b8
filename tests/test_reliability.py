"""The data tools and readers under bad input: every file, flag or record a user can get wrong ends in one line that
names it and says what to do; --overwrite replaces only what prepare_sft.py made; nothing is silently accepted."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import prepare_sft
from conftest import subprocess_env
import loaders.sft as sft
from loaders.sft import SFTLoader, read_examples
from test_prepare_sft import write_jsonl, write_llama3_folder
from test_train import ROOT
from tokenization import load_tokenizer
from tokenization.tokenizer import gpt2_data_dir
from tools.errors import UserError

OK = {"prompt": "to be", "completion": " or not"}
CHAT = [{"role": "user", "content": "who wrote hamlet"}, {"role": "assistant", "content": "shakespeare"}]


def prepare(tmp_path, rows, out="out", **kwargs):
    data = write_jsonl(tmp_path / f"{out}.jsonl", rows)
    return prepare_sft.prepare(data, data, tmp_path / out, **kwargs)


def command(*argv, env=None):
    """A tool run as `python TOOL ARGV`: (exit code, stderr)."""
    done = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**subprocess_env(), **(env or {})})
    return done.returncode, done.stderr


# --- records: refused by file, line and field ---------------------------------------------------------------------
@pytest.mark.parametrize("row, message", [
    ({"prompt": [{"role": "user", "content": "hi"}], "completion": "hello"},
     "field 'completion' must be a list of assistant messages when 'prompt' is a list of messages"),
    ({"prompt": "a", "completion": " b", "messages": CHAT}, "the fields of messages and prompt/completion records"),
    ({"prompt": "a", "chosen": " same", "rejected": " same"}, "'chosen' and 'rejected' are the same answer"),
    ({"prompt": [CHAT[0]], "chosen": [CHAT[1]], "rejected": [CHAT[1]]}, "'chosen' and 'rejected' are the same"),
    ({"messages": CHAT, "prompt": "a"}, "has \"messages\" and \"prompt\""),
], ids=["conversational-prompt-string-completion", "messages-and-completion", "same-answers", "same-chat-answers",
        "messages-and-prompt"])
def test_an_ambiguous_or_useless_record_is_refused_by_file_and_line(tmp_path, row, message):
    with pytest.raises(UserError, match=f"out.jsonl:1: .*{message}"):
        prepare(tmp_path, [row])
    assert not (tmp_path / "out").exists()


LATIN_1 = '{"prompt": "café", "completion": " b"}\n'.encode("latin-1")


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, LATIN_1], ids=["binary", "latin-1"])
def test_a_binary_or_non_utf8_input_file_is_named_with_its_line(tmp_path, content):
    (tmp_path / "d.jsonl").write_bytes(content)
    with pytest.raises(UserError, match=f"{tmp_path / 'd.jsonl'}:1: (not UTF-8 text|a binary file)"):
        prepare_sft.prepare(tmp_path / "d.jsonl", tmp_path / "d.jsonl", tmp_path / "out")


def test_a_conversational_prompt_completion_trains_on_the_completion_only(tmp_path):
    context = [CHAT[0], {"role": "assistant", "content": "who?"}, {"role": "user", "content": "hamlet"}]
    prepare(tmp_path, [{"prompt": context, "completion": [{"role": "assistant", "content": "shakespeare"}]}])
    _, [(ids, mask)] = read_examples(tmp_path / "out", "train")
    assert load_tokenizer().decode(ids[mask].tolist()) == " shakespeare<|endoftext|>"  # not the prompt's "who?"


@pytest.mark.parametrize("flag, value", [("shard_size", 0), ("shard_size", -5)])
def test_a_numeric_flag_out_of_range_is_refused_by_name(tmp_path, flag, value):
    with pytest.raises(UserError, match=f"--{flag}={value}"):
        prepare(tmp_path, [OK], **{flag: value})


# --- chat templates -----------------------------------------------------------------------------------------------
def folder_with_template(tmp_path, template):
    folder = write_llama3_folder(tmp_path / "model")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return folder


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('only user and assistant roles') }}", "refuses this chat: only user and assistant roles"),
    ("{{ ''.__class__.__mro__ }}", r"fails \(SecurityError\): access to attribute '__class__'"),
    ("{% for m in messages %}{{ m.content }", r"is not valid Jinja \(line 1"),
], ids=["raise_exception", "sandbox", "syntax"])
def test_a_chat_template_that_fails_is_a_refusal_naming_the_template(tmp_path, template, message):
    folder = folder_with_template(tmp_path, template)
    with pytest.raises(UserError, match=f"the chat template of {folder} {message}"):
        prepare(tmp_path, [{"messages": CHAT}], tokenizer=folder)


def test_a_template_that_renders_no_assistant_text_is_refused_instead_of_training_on_nothing(tmp_path):
    silent = "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    folder = folder_with_template(tmp_path, silent)
    with pytest.raises(UserError, match="out.jsonl:1: nothing to train on: the chat template of .* renders no "
                                        "assistant text"):
        prepare(tmp_path, [{"messages": CHAT}], tokenizer=folder)


# --- --overwrite and killed runs ----------------------------------------------------------------------------------
def test_overwrite_replaces_only_the_files_prepare_made(tmp_path):
    prepare(tmp_path, [OK] * 4, shard_size=8)  # four shards a split
    (tmp_path / "out" / "notes.txt").write_text("mine")
    (tmp_path / "out" / "eval").mkdir()
    (tmp_path / "out" / "eval" / "scores.json").write_text("{}")
    prepare(tmp_path, [{"prompt": "other", "completion": " data"}], overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["eval", "notes.txt", "sft.json",
                                                                     "train_000000.npz", "val_000000.npz"]
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    _, [(ids, _)] = read_examples(tmp_path / "out", "train")
    assert load_tokenizer().decode(ids.tolist()) == "<|endoftext|>other data<|endoftext|>"


def test_an_overwrite_killed_halfway_leaves_a_folder_nothing_reads_and_the_next_overwrite_finishes(tmp_path,
                                                                                                   monkeypatch):
    prepare(tmp_path, [OK] * 2)
    (tmp_path / "out" / "notes.txt").write_text("mine")
    real_replace, moved = os.replace, []

    def replace_then_die(src, dst):
        real_replace(src, dst)
        moved.append(dst)
        if len(moved) == 2:  # the old sft.json set aside, one new shard moved in: killed
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, [{"prompt": "other", "completion": " data"}], overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    with pytest.raises(FileNotFoundError, match="has no sft.json"):  # never a mix of old and new shards
        read_examples(tmp_path / "out", "train")
    prepare(tmp_path, [{"prompt": "other", "completion": " data"}], overwrite=True)
    assert len(read_examples(tmp_path / "out", "train")[1]) == 1
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temp folder left


def test_a_shard_that_sft_json_does_not_list_is_never_read(tmp_path):
    prepare(tmp_path, [OK])
    os.link(tmp_path / "out" / "train_000000.npz", tmp_path / "out" / "train_000001.npz")  # a stray copy
    assert len(read_examples(tmp_path / "out", "train")[1]) == 1


KILLED_PREPARE = """
import sys, time
sys.path.insert(0, {root!r})
import numpy as np
import prepare_sft
real_savez = np.savez
def savez_then_hang(*args, **kwargs):
    real_savez(*args, **kwargs)
    print("wrote a shard", flush=True)
    time.sleep(60)
np.savez = savez_then_hang
prepare_sft.prepare({data!r}, {data!r}, {out!r})
"""


def test_the_temp_folder_of_a_killed_prepare_is_removed_by_the_next_run_and_a_live_one_is_not(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [OK])
    script = KILLED_PREPARE.format(root=str(ROOT), data=str(data), out=str(tmp_path / "out"))
    killed, live = (subprocess.Popen([sys.executable, "-c", script], env=subprocess_env(), stdout=subprocess.PIPE,
                                     text=True) for _ in range(2))
    try:
        assert killed.stdout.readline() == live.stdout.readline() == "wrote a shard\n"
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        temps = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out."))
        assert len(temps) == 2
        prepare_sft.prepare(data, data, tmp_path / "out")
        left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out."))
        assert len(left) == 1 and left[0] in temps  # the live run's temp folder stays
    finally:
        for process in (killed, live):
            process.kill()
            process.wait()
            process.stdout.close()


# --- data read back: damaged, foreign, another tokenizer ----------------------------------------------------------
def test_a_broken_sft_json_or_a_truncated_shard_is_named(tmp_path):
    prepare(tmp_path, [OK])
    shard = tmp_path / "out" / "train_000000.npz"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match=f"{shard} is not a readable shard .*truncated"):
        read_examples(tmp_path / "out", "train")
    (tmp_path / "out" / "sft.json").write_text('{"format": "nanolora-sft-1", "tok')
    with pytest.raises(UserError, match=r"sft.json is not valid JSON .*prepare_sft.py --overwrite"):
        read_examples(tmp_path / "out", "train")


def test_data_tokenized_with_another_tokenizer_is_refused_though_its_ids_fit(tmp_path):
    from model import GPT, GPTConfig
    llama3 = write_llama3_folder(tmp_path / "llama3")
    prepare(tmp_path, [{"messages": CHAT}], tokenizer=llama3)  # ids < 20: they fit GPT-2's vocabulary
    GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path / "gpt2")
    loader = SFTLoader(tmp_path / "out", 1, 32)
    loader.check_vocab(50304)
    with pytest.raises(UserError, match=f"was tokenized with {llama3}, another tokenizer than the model's"):
        loader.check_tokenizer(tmp_path / "gpt2")
    loader.check_tokenizer(llama3)  # the same tokenizer, and a model from scratch, pass
    loader.check_tokenizer(None)
    import sft_eval
    with pytest.raises(UserError, match="another tokenizer than the model's"):
        sft_eval.main(["--data", str(tmp_path / "out"), "--model", str(tmp_path / "gpt2")])


def test_a_gguf_file_and_the_folder_converted_from_it_are_one_tokenizer(tmp_path):
    gguf = pytest.importorskip("gguf")
    from formats.gguf import convert_gguf
    from test_gguf import make_hf_llama, write_gguf
    path = write_gguf(tmp_path / "tiny.gguf", make_hf_llama(tied=True), gguf.GGMLQuantizationType.F32)
    header = prepare(tmp_path, [{"messages": [{"role": "user", "content": "the romeo"},
                                              {"role": "assistant", "content": "and the rest"}]}], tokenizer=path)
    sft.check_tokenizer(tmp_path / "out", header, convert_gguf(path, tmp_path / "converted"))
    with pytest.raises(UserError, match="another tokenizer"):
        sft.check_tokenizer(tmp_path / "out", header, "gpt2")


def test_reference_log_probs_of_data_prepared_again_are_refused_though_the_pair_count_is_the_same(tmp_path):
    import torch
    from loaders.dpo import DPOLoader, precompute_reference
    pair = {"prompt": "to be", "chosen": " yes", "rejected": " no"}
    prepare(tmp_path, [pair] * 2)

    def loaders():
        return [DPOLoader(tmp_path / "out", 1, 16, split=split) for split in ("train", "val")]
    path = tmp_path / "out" / "reference_logps_abc.npz"
    precompute_reference(loaders(), lambda x, y: torch.zeros(len(x)), path, "cpu")
    prepare(tmp_path, [{**pair, "rejected": " never"}] * 2, overwrite=True)  # same count, other data
    assert path.exists()  # not prepare_sft.py's file: kept
    with pytest.raises(UserError, match=f"{path} holds the reference log-probs of other data"):
        precompute_reference(loaders(), None, path, "cpu")
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(UserError, match=f"{path} is not a readable file of reference log-probs"):
        precompute_reference(loaders(), None, path, "cpu")


def test_a_truncated_token_shard_is_named(tmp_path):
    from loaders.tokens import DataLoaderLite
    tmp_path.joinpath("data").mkdir()
    np.save(tmp_path / "data" / "t_train_000000.npy", np.arange(5000, dtype=np.uint16))
    shard = tmp_path / "data" / "t_train_000000.npy"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(UserError, match=f"shard {shard} is not a readable .npy array .*truncated"):
        DataLoaderLite(tmp_path / "data", 2, 8)


# --- tokenizers and .gguf files -----------------------------------------------------------------------------------
def test_a_folder_of_gpt2s_vocab_json_and_merges_txt_is_gpt2s_tokenizer(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "vocab.json").write_bytes(Path(gpt2_data_dir(), "encoder.json").read_bytes())
    (tmp_path / "gpt2" / "merges.txt").write_bytes(Path(gpt2_data_dir(), "vocab.bpe").read_bytes())
    assert load_tokenizer(tmp_path / "gpt2").name == "gpt2"
    (tmp_path / "gpt2" / "vocab.json").write_text(json.dumps({"a": 0, "b": 1}))
    with pytest.raises(UserError, match="vocab.json \\+ merges.txt without tokenizer.json; write its tokenizer.json"):
        load_tokenizer(tmp_path / "gpt2")


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    gguf = pytest.importorskip("gguf")
    from test_gguf import make_hf_llama, write_gguf
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", make_hf_llama(tied=True),
                      gguf.GGMLQuantizationType.F32)
    return path.read_bytes(), gguf.GGUFReader(path).data_offset


@pytest.mark.parametrize("entry", ["load", "tokenizer", "convert"])
@pytest.mark.parametrize("where", [0.05, 0.5, 0.95, 1.5], ids=["header", "metadata", "tokens", "tensors"])
def test_a_gguf_file_cut_short_is_named_at_every_entry_point(tmp_path, gguf_bytes, entry, where):
    from formats.gguf import convert_gguf, load_gguf
    data, metadata_end = gguf_bytes
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:int(metadata_end * where)])
    run = {"load": lambda: load_gguf(path), "tokenizer": lambda: load_tokenizer(path),
           "convert": lambda: convert_gguf(path, tmp_path / "converted")}[entry]
    with pytest.raises(UserError, match=f"{path}: a GGUF file cut short or damaged"):
        run()
    assert not (tmp_path / "converted").exists()


# --- the command lines: one line, --debug and NANOLORA_DEBUG for the traceback ------------------------------------
def test_sample_takes_debug_and_reports_a_prompt_file_that_is_a_folder_in_one_line(tmp_path):
    from model import GPT, GPTConfig
    GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path / "hf")
    argv = ["sample.py", f"--init_from={tmp_path / 'hf'}", f"--start=FILE:{tmp_path}", "--device=cpu"]
    code, err = command(*argv)
    assert code == 1 and err == f"error: --start=FILE:{tmp_path}: a folder; name a text file holding the prompt " \
                                 f"(run with --debug or NANOLORA_DEBUG=1 for the traceback)\n"
    code, err = command(*argv, "--debug")
    assert code == 1 and "Traceback" in err and "a folder; name a text file" in err
    code, err = command(*argv, env={"NANOLORA_DEBUG": "1"})
    assert code == 1 and "Traceback" in err


@pytest.mark.parametrize("flag", ["--temperature=nan", "--num_samples=x", "--device=gpu"])
def test_a_bad_sample_flag_is_refused_by_name_before_the_model_loads(tmp_path, flag):
    import sample
    with pytest.raises(UserError, match=flag.split("=")[0].lstrip("-")):
        sample.main([f"--init_from={tmp_path / 'nowhere'}", flag])


def test_the_other_tools_report_a_user_error_in_one_line(tmp_path):
    (tmp_path / "log.jsonl").write_text('{"step": 0, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.0}\n'
                                        '{"step": 1, "eval_rewa')  # the last line torn by a kill
    for argv, message in ((["sft_eval.py", "--data", tmp_path / "none"], "has no sft.json"),
                          (["dpo_eval.py", tmp_path / "none"], "no such file; name the out_dir of a DPO run"),
                          (["fineweb.py", "--source", "files", tmp_path / "log.jsonl", "--num_proc=0"], "--num_proc")):
        code, err = command(*argv)
        assert code == 1 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    import dpo_eval
    assert dpo_eval.reward_accuracy_summary(tmp_path).startswith("held-out reward accuracy: 0.500 at step 0")
