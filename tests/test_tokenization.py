"""load_tokenizer: the same ids as transformers' AutoTokenizer (tokenizer.json, .gguf) or tiktoken (GPT-2) for every
kind of spec a model can be named by, the chat template carried along, and one ValueError per user mistake."""
import json
import shutil

import pytest
import torch

from tokenization import load_tokenizer
from tokenization.chat import chat_ids, render_chat
from tokenization.tokenizer import EOT, GPT2Tokenizer, gpt2_encoding

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")

TEXTS = ["the romeo and the rest", "  Wherefore art thou, Romeo?\n\n\tO happy dagger!", "naïve café 🤖 中文 123",
         "<|im_start|>user\nhi<|im_end|>\n", "a <|endoftext|> inside", ""]
CHAT = [{"role": "user", "content": "the romeo"}, {"role": "assistant", "content": "and the rest"}]


def out_dir(folder, base):
    """A training out_dir as far as the tokenizer is concerned: ckpt.pt records the run's base."""
    folder.mkdir()
    torch.save({"base": None if base is None else str(base)}, folder / "ckpt.pt")
    return folder


def adapter(folder, base):
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny byte-level BPE model as a .gguf file (tests/test_gguf.py writes it as llama.cpp does), the Hugging Face
    folder convert_gguf makes of it, and a copy of that folder whose tokenizer puts BOS in front (as LLaMA's)."""
    from formats.gguf import convert_gguf
    from test_gguf import make_hf_llama, write_gguf
    tmp = tmp_path_factory.mktemp("models")
    path = write_gguf(tmp / "tiny.gguf", make_hf_llama(tied=True), gguf.GGMLQuantizationType.F32)
    folder = convert_gguf(path, tmp / "converted")
    bos = shutil.copytree(folder, tmp / "with_bos")
    tok = tokenizers.Tokenizer.from_file(str(bos / "tokenizer.json"))
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", tok.token_to_id("<|im_start|>"))])
    tok.save(str(bos / "tokenizer.json"))
    return path, folder, bos


def specs(tmp_path, model):
    """Every way to name `model`: itself, an out_dir trained from it, an adapter on that out_dir, an adapter on it."""
    run = out_dir(tmp_path / "run", model)
    return [model, run, run / "ckpt.pt", adapter(tmp_path / "adapter_on_run", run),
            adapter(tmp_path / "adapter", model)]


@pytest.mark.parametrize("kind", ["folder", "folder_with_bos", "gguf"])
def test_every_spec_of_a_tokenizer_json_model_gives_autotokenizers_ids(models, tmp_path, kind):
    path, folder, bos = models
    model = {"folder": folder, "folder_with_bos": bos, "gguf": path}[kind]
    theirs = (transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name) if kind == "gguf" else
              transformers.AutoTokenizer.from_pretrained(model))
    for spec in specs(tmp_path, model):
        ours = load_tokenizer(spec, vocab_size=len(theirs))
        assert ours.name == str(model)  # the file or folder the tokenizer came from
        assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id)
        for text in TEXTS:
            assert ours.encode(text) == theirs(text).input_ids, (spec, text)
            assert ours.encode(text, add_special_tokens=False) == theirs(text, add_special_tokens=False).input_ids
            assert (ours.encode(text, split_special_tokens=True)
                    == theirs(text, split_special_tokens=True).input_ids)  # "<|im_end|>" as text, for web pages
            assert ours.decode(ours.encode(text, add_special_tokens=False)) == text
    assert load_tokenizer(path).encode("the romeo")[0] != load_tokenizer(bos).encode("the romeo")[0]  # BOS or not


@pytest.mark.parametrize("kind", ["folder", "gguf"])
def test_the_chat_template_comes_with_the_tokenizer_and_renders_as_transformers(models, tmp_path, kind):
    path, folder, _ = models
    theirs = transformers.AutoTokenizer.from_pretrained(folder)  # the template convert_gguf copied from the file
    for spec in specs(tmp_path, path if kind == "gguf" else folder):
        ours = load_tokenizer(spec)
        assert render_chat(ours, CHAT[:1], add_generation_prompt=True) == theirs.apply_chat_template(
            CHAT[:1], tokenize=False, add_generation_prompt=True)
        ids, mask = chat_ids(ours, CHAT)
        assert ids == list(theirs.apply_chat_template(CHAT, tokenize=True, return_dict=True)["input_ids"])
        assert theirs.decode([i for i, m in zip(ids, mask) if m]) == "and the rest<|im_end|>"


def test_every_spec_of_a_gpt2_model_gives_tiktokens_ids(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')  # a GPT-2 checkpoint's folder
    scratch = out_dir(tmp_path / "scratch", None)  # a run from scratch, on GPT-2 shards
    (tmp_path / "on_gpt2").mkdir()
    enc = gpt2_encoding()
    on_gpt2 = specs(tmp_path / "on_gpt2", tmp_path / "gpt2")  # the folder, a run trained from it, adapters
    for spec in (None, "gpt2", scratch, adapter(tmp_path / "adapter", scratch), *on_gpt2):
        ours = load_tokenizer(spec, vocab_size=50304)
        assert isinstance(ours, GPT2Tokenizer) and ours.name == "gpt2"
        for text in TEXTS:
            assert ours.encode(text) == [EOT] + enc.encode(text, allowed_special="all")
            assert ours.encode(text, split_special_tokens=True) == [EOT] + enc.encode_ordinary(text)


# ---- user mistakes: one ValueError each, naming the path and what to do ---------------------------------------------
def test_a_model_folder_without_tokenizer_json_is_refused(models, tmp_path):
    _, folder, _ = models
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "config.json", bare)
    with pytest.raises(ValueError, match=f"^{bare}: a model folder without tokenizer.json; copy the checkpoint's"):
        load_tokenizer(bare)


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=f"^{tmp_path}: not a model .*; name a Hugging Face model folder"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="notes.txt: a file, but neither a .gguf model nor a checkpoint"):
        load_tokenizer(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="missing: no such file or folder, nor a model in the Hugging Face cache"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="missing.gguf: no such .gguf file"):
        load_tokenizer(tmp_path / "missing.gguf")


def test_a_tokenizer_with_more_ids_than_the_model_is_refused_by_name(models):
    path, _, _ = models
    with pytest.raises(ValueError, match="^gpt2: GPT-2's tokenizer has 50,257 tokens but the model has vocab_size "
                                         "1,000, so it cannot serve this model; name the model's own tokenizer"):
        load_tokenizer(None, vocab_size=1000)
    with pytest.raises(ValueError, match=f"^{path}: the tokenizer of {path} has 272 tokens but the model has "
                                         f"vocab_size 100"):
        load_tokenizer(path, vocab_size=100)
    assert load_tokenizer(path, vocab_size=272).vocab_size == 272


def test_runs_and_adapters_that_lead_to_no_tokenizer_are_refused_naming_both(tmp_path):
    gone = out_dir(tmp_path / "run", tmp_path / "deleted_base")
    with pytest.raises(ValueError, match=f"deleted_base \\(the base of {gone}\\): no such file or folder"):
        load_tokenizer(gone)
    itself = out_dir(tmp_path / "again", tmp_path / "again")  # init_from=its own out_dir
    with pytest.raises(ValueError, match="again .the base of .*again.: the run records itself as its base"):
        load_tokenizer(itself)
    (tmp_path / "no_base").mkdir()
    (tmp_path / "no_base" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no_base: adapter_config.json names no base_model_name_or_path"):
        load_tokenizer(tmp_path / "no_base")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken/ckpt.pt is not a readable checkpoint"):
        load_tokenizer(tmp_path / "broken")
