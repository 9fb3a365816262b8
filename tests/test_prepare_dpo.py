"""prepare_sft.py on preference pairs: the two TRL formats, one prompt for both answers, errors, truncation."""
import pytest

import prepare_sft
from loaders.sft import read_examples
from test_prepare_sft import write_jsonl
from tokenization.tokenizer import EOT, gpt2_encoding

PAIR = {"prompt": "To be, or not", "chosen": " to be", "rejected": " at all, my lord"}
CHAT_PAIR = {"prompt": [{"role": "user", "content": "who wrote hamlet"}, {"role": "assistant", "content": "who?"},
                        {"role": "user", "content": "hamlet"}],
             "chosen": [{"role": "assistant", "content": "shakespeare"}],
             "rejected": [{"role": "assistant", "content": "marlowe"}]}


def test_a_pair_is_two_examples_with_the_same_prompt_and_the_mask_on_each_answer(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [PAIR])
    header = prepare_sft.prepare(data, data, tmp_path / "out")
    _, [(chosen, chosen_mask), (rejected, rejected_mask)] = read_examples(tmp_path / "out", "train", "preference")
    enc = gpt2_encoding()
    prompt = [EOT] + enc.encode_ordinary("To be, or not")
    assert chosen.tolist() == prompt + enc.encode_ordinary(" to be") + [EOT]
    assert rejected.tolist() == prompt + enc.encode_ordinary(" at all, my lord") + [EOT]
    assert chosen_mask.tolist() == [0] * len(prompt) + [1] * (len(chosen) - len(prompt))
    assert rejected_mask.tolist() == [0] * len(prompt) + [1] * (len(rejected) - len(prompt))
    assert header["kind"] == "preference" and header["splits"]["train"]["examples"] == 1


def test_a_conversational_pair_masks_only_the_final_answer(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [CHAT_PAIR])
    prepare_sft.prepare(data, data, tmp_path / "out")
    _, [(chosen, chosen_mask), (rejected, rejected_mask)] = read_examples(tmp_path / "out", "train", "preference")
    enc = gpt2_encoding()
    assert enc.decode(chosen[chosen_mask].tolist()) == " shakespeare<|endoftext|>"  # not the prompt's "who?"
    assert enc.decode(rejected[rejected_mask].tolist()) == " marlowe<|endoftext|>"
    start = int(chosen_mask.argmax())
    assert chosen[:start].tolist() == rejected[:start].tolist()


def test_a_too_long_pair_keeps_one_prompt_for_both_answers_or_is_dropped_whole(tmp_path):
    long = {"prompt": " ".join(["word"] * 40), "chosen": " yes", "rejected": " no, never, not in a thousand years"}
    data = write_jsonl(tmp_path / "d.jsonl", [long, PAIR])
    header = prepare_sft.prepare(data, data, tmp_path / "cut", block_size=16)
    _, examples = read_examples(tmp_path / "cut", "train", "preference")
    (chosen, chosen_mask), (rejected, rejected_mask) = examples[:2]
    assert len(rejected) == 16 and len(chosen) < 16
    enc = gpt2_encoding()
    assert enc.decode(rejected[rejected_mask].tolist()) == " no, never, not in a thousand years<|endoftext|>"
    assert enc.decode(chosen[chosen_mask].tolist()) == " yes<|endoftext|>"
    assert chosen[~chosen_mask].tolist() == rejected[~rejected_mask].tolist()  # the same prompt tokens
    assert header["splits"]["train"]["truncated"] == 1
    prepare_sft.prepare(data, data, tmp_path / "drop", block_size=16, truncation="drop")
    assert len(read_examples(tmp_path / "drop", "train", "preference")[1]) == 2  # PAIR only, both halves


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "chosen": "b"}', r"d.jsonl:2: field 'rejected' is missing"),
    ('{"chosen": "b", "rejected": "c"}', r"d.jsonl:2: field 'prompt' is missing"),
    ('{"prompt": "a", "chosen": "", "rejected": "c"}', r"d.jsonl:2: field 'chosen' must be a non-empty string"),
    ('{"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "user", "content": "b"}], '
     '"rejected": [{"role": "assistant", "content": "c"}]}', r"d.jsonl:2: field 'chosen' must"),
    ('{"prompt": "a", "completion": "b"}', r"d.jsonl:2: a sft record in a file of preference records"),
])
def test_bad_pairs_stop_with_file_line_and_field(tmp_path, line, message):
    data = write_jsonl(tmp_path / "d.jsonl", [PAIR, line])
    with pytest.raises(ValueError, match=message):
        prepare_sft.prepare(data, data, tmp_path / "out")
    assert not (tmp_path / "out").exists()
