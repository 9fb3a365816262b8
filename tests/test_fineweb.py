"""fineweb.py: documents -> EOT-separated uint16 token shards, val first, atomic and resumable."""
import json
import os
import re
import sys
import types

import numpy as np
import pytest

import fineweb
from tokenization.tokenizer import EOT, gpt2_encoding

DOCS = [
    "First document.\nIt has two lines,\r\nthe second one written on Windows.",
    "  Second: unicode café 🤖, numbers 3.14, and it's got contractions.",
    "Third <|endoftext|> is just text here",
    "",
    "Fifth and last " * 20,
]


def write_corpus(folder):
    """DOCS as two .txt files and a .jsonl file (with an extra key and a blank line); returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text(DOCS[0], encoding="utf-8")
    (folder / "b.txt").write_text(DOCS[1], encoding="utf-8")
    rows = [json.dumps({"id": i, "text": doc}) for i, doc in enumerate(DOCS[2:])]
    (folder / "c.jsonl").write_text(rows[0] + "\n\n" + "\n".join(rows[1:]) + "\n", encoding="utf-8")
    return [str(folder / "a.txt"), str(folder / "b.txt"), str(folder / "c.jsonl")]


def shard_names(out_dir):
    return sorted(name for name in os.listdir(out_dir) if name.endswith(".npy"))


def read_stream(out_dir):
    """All shards of a folder concatenated in index order (the index is the last 6 digits of the name)."""
    names = sorted(shard_names(out_dir), key=lambda name: name[-10:-4])
    return np.concatenate([np.load(os.path.join(out_dir, name), allow_pickle=False) for name in names])


def test_shards_decode_to_the_documents_each_prefixed_by_eot(tmp_path):
    paths = write_corpus(tmp_path / "in")
    fineweb.main(["--source", "files", *paths, "--out_dir", str(tmp_path / "out"), "--shard_size", "16"])
    tokens = read_stream(tmp_path / "out")
    assert tokens.dtype == np.uint16
    assert gpt2_encoding().decode(tokens.tolist()) == "".join("<|endoftext|>" + doc for doc in DOCS)
    assert (tokens == EOT).sum() == len(DOCS)  # the literal "<|endoftext|>" in DOCS[2] is not a boundary


def test_first_shard_is_val_and_the_rest_are_train(tmp_path):
    fineweb.prepare("files", write_corpus(tmp_path / "in"), out_dir=tmp_path / "out", prefix="mine", shard_size=16)
    names = shard_names(tmp_path / "out")
    assert names[-1] == "mine_val_000000.npy"
    assert names[:-1] == [f"mine_train_{i:06d}.npy" for i in range(1, len(names))]


def test_every_shard_but_the_last_holds_exactly_shard_size_tokens(tmp_path):
    results = fineweb.prepare("files", write_corpus(tmp_path / "in"), out_dir=tmp_path / "out", shard_size=16)
    sizes = [len(np.load(r.path)) for r in results]
    assert len(sizes) > 3
    assert sizes[:-1] == [16] * (len(sizes) - 1) and 1 <= sizes[-1] <= 16


def test_rerun_skips_finished_shards_without_writing(tmp_path, monkeypatch):
    paths = write_corpus(tmp_path / "in")
    first = fineweb.prepare("files", paths, out_dir=tmp_path / "out", shard_size=16)
    before = {r.path: (os.stat(r.path).st_mtime_ns, np.load(r.path).tolist()) for r in first}

    def no_writes(path, tokens):
        raise AssertionError(f"re-run rewrote {path}")
    monkeypatch.setattr(fineweb, "save_shard", no_writes)
    second = fineweb.prepare("files", paths, out_dir=tmp_path / "out", shard_size=16)
    assert not any(r.written for r in second)
    assert {r.path: (os.stat(r.path).st_mtime_ns, np.load(r.path).tolist()) for r in second} == before


def test_interrupted_run_leaves_no_partial_shard_and_a_rerun_finishes_it_identically(tmp_path, monkeypatch):
    paths = write_corpus(tmp_path / "in")
    fineweb.prepare("files", paths, out_dir=tmp_path / "reference", shard_size=16)

    real_save, calls = np.save, []
    def crash_on_third_shard(file, array, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # write half the shard, then die like a Ctrl-C would
            real_save(file, array[: len(array) // 2])
            raise KeyboardInterrupt
        real_save(file, array, *args, **kwargs)
    monkeypatch.setattr(np, "save", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        fineweb.prepare("files", paths, out_dir=tmp_path / "out", shard_size=16)
    monkeypatch.undo()
    # only the two finished shards carry final names, and no temp file is left behind
    assert shard_names(tmp_path / "out") == ["files_train_000001.npy", "files_val_000000.npy"]

    results = fineweb.prepare("files", paths, out_dir=tmp_path / "out", shard_size=16)
    assert [r.written for r in results[:3]] == [False, False, True]
    assert shard_names(tmp_path / "out") == shard_names(tmp_path / "reference")
    for name in shard_names(tmp_path / "out"):
        assert np.array_equal(np.load(tmp_path / "out" / name), np.load(tmp_path / "reference" / name))


def test_rerun_with_another_shard_size_into_the_same_folder_is_an_error(tmp_path):
    paths = write_corpus(tmp_path / "in")
    fineweb.prepare("files", paths, out_dir=tmp_path / "out", shard_size=16)
    with pytest.raises(ValueError, match=r"files_val_000000\.npy exists but differs.*--out_dir"):
        fineweb.prepare("files", paths, out_dir=tmp_path / "out", shard_size=20)


def test_multiprocess_tokenization_writes_the_same_shards_as_one_process(tmp_path):
    paths = write_corpus(tmp_path / "in") * 3  # enough documents for several pool chunks
    fineweb.prepare("files", paths, out_dir=tmp_path / "one", shard_size=16, num_proc=1)
    fineweb.prepare("files", paths, out_dir=tmp_path / "two", shard_size=16, num_proc=2)
    assert np.array_equal(read_stream(tmp_path / "one"), read_stream(tmp_path / "two"))


def test_jsonl_line_without_text_is_an_error_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"content": "no text key"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: .*\"text\""):
        fineweb.prepare("files", [str(bad)], out_dir=tmp_path / "out", shard_size=16)


def test_jsonl_line_that_is_not_json_is_an_error_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        list(fineweb.iter_file_documents([str(bad)]))


def test_fineweb_edu_feeds_the_hub_dataset_through_the_same_pipeline(tmp_path, monkeypatch):
    requested = {}
    def load_dataset(path, name, split, streaming):
        requested.update(path=path, name=name, split=split)
        return [{"text": doc, "id": i} for i, doc in enumerate(DOCS)]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    fineweb.prepare("fineweb-edu", out_dir=tmp_path / "out", shard_size=16, num_proc=1)
    assert requested == {"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train"}
    assert gpt2_encoding().decode(read_stream(tmp_path / "out").tolist()) == "".join("<|endoftext|>" + d for d in DOCS)


def test_fineweb_edu_without_datasets_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        next(fineweb.iter_fineweb_edu_docs())


def test_play_markdown_becomes_plain_play_text():
    markdown = (
        "# Romeo and Juliet\n\n## ACT I\n\n### SCENE I. Verona.\n\n"
        "_Enter SAMPSON and GREGORY, armed with swords and\nbucklers_\n\n"
        "**SAMPSON**  \nGregory, o' my word, we'll not carry coals.  \n__\\[Aside]_  \n"
        "\\--or 'Fair-ladies--I would wish  \n*Exeunt.*\n"
    )
    assert fineweb.clean_play_markdown(markdown) == (
        "Romeo and Juliet\n\nACT I\n\nSCENE I. Verona.\n\n"
        "Enter SAMPSON and GREGORY, armed with swords and\nbucklers\n\n"
        "SAMPSON:\nGregory, o' my word, we'll not carry coals.\n[Aside]\n"
        "--or 'Fair-ladies--I would wish\nExeunt.\n"
    )


def test_held_out_plays_are_exactly_the_val_documents():
    val_docs, train_docs = fineweb.shakespeare_documents()
    titles = lambda docs: [doc.split("\n", 1)[0] for doc in docs]  # noqa: E731
    assert sorted(titles(val_docs)) == ["Julius Caesar", "The Tempest", "Twelfth Night"]
    assert len(train_docs) == len(fineweb.shakespeare_play_paths()) - 3 - 3 > 30
    assert not set(titles(train_docs)) & set(titles(val_docs))


def test_romances_are_left_out_of_the_base_corpus_for_lora_fine_tuning():
    _, base_train = fineweb.shakespeare_documents()
    val_docs, train_docs = fineweb.shakespeare_documents(fineweb.FINETUNE_VAL_PLAYS,
                                                         train_plays=fineweb.FINETUNE_PLAYS)
    titles = lambda docs: sorted(doc.split("\n", 1)[0] for doc in docs)  # noqa: E731
    assert titles(val_docs) == ["The Tempest"]
    assert titles(train_docs) == ["A Winter's Tale", "Cymbeline", "Pericles"]
    assert not set(titles(train_docs) + titles(val_docs)) & set(titles(base_train))


def test_default_shakespeare_shards_hold_the_val_plays_in_val_only(tmp_path):
    # the real corpus with the default shard size (~1.5M tokens: a couple of seconds)
    results = fineweb.prepare("shakespeare", out_dir=tmp_path)
    val = [r for r in results if r.split == "val"]
    train = [r for r in results if r.split == "train"]
    assert len(val) >= 1 and len(train) >= 1 and results[0].split == "val"

    def plays(shard_results):
        text = gpt2_encoding().decode(np.concatenate([np.load(r.path) for r in shard_results]).tolist())
        assert text.startswith("<|endoftext|>")
        return [doc.split("\n", 1)[0] for doc in text.split("<|endoftext|>")[1:]]  # titles
    assert sorted(plays(val)) == ["Julius Caesar", "The Tempest", "Twelfth Night"]
    train_plays = plays(train)
    assert len(train_plays) == len(fineweb.shakespeare_play_paths()) - 3 - len(fineweb.FINETUNE_PLAYS)
    assert "Romeo and Juliet" in train_plays
    assert not {"Julius Caesar", "The Tempest", "Twelfth Night"} & set(train_plays)


def make_hf_tokenizer_folder(folder, n_words):
    """A word-level tokenizer.json (the `tokenizers` package's format, as LLaMA checkpoints ship) + config.json."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    vocab = {"<s>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(n_words)}}
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])  # BOS, as LLaMA
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text('{"bos_token_id": 0, "eos_token_id": 1}')
    return folder


@pytest.mark.parametrize("n_words, dtype", [(100, np.uint16), (70_000, np.uint32)])
def test_checkpoint_tokenizer_writes_bos_prefixed_shards_of_a_fitting_dtype(tmp_path, n_words, dtype):
    tok_dir = make_hf_tokenizer_folder(tmp_path / "tok", n_words)
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "w5 w7 w99"}\n{"text": "w3"}\n')
    results = fineweb.prepare("files", [str(docs)], out_dir=tmp_path / "out", shard_size=4, tokenizer=tok_dir)
    tokens = np.concatenate([np.load(r.path) for r in results])
    assert tokens.dtype == dtype
    assert tokens.tolist() == [0, 7, 9, 101, 0, 5]  # ids: w_i -> i + 2, each document opened by BOS (0)


def test_a_special_tokens_text_in_a_document_is_text_not_a_boundary_for_a_checkpoint_tokenizer_too(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok_dir = make_hf_tokenizer_folder(tmp_path / "tok", 10)
    tok = tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    tok.add_special_tokens(["<s>"])  # BOS matched whole when a chat template writes it
    tok.save(str(tok_dir / "tokenizer.json"))
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "w3 <s> w4"}\n')
    results = fineweb.prepare("files", [str(docs)], out_dir=tmp_path / "out", shard_size=100, tokenizer=tok_dir)
    tokens = np.concatenate([np.load(r.path) for r in results]).tolist()
    assert tokens == [0, 5, 1, 1, 1, 6]  # BOS opens the document; "<s>" in it is "<", "s", ">" (unknown words)


# ---- shards.json: the tokenizer the shards were made with ---------------------------------------------------------
def gpt2_shards(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(f'{{"text": "document number {i} says hello"}}\n' for i in range(40)))
    fineweb.prepare("files", [str(docs)], out_dir=tmp_path / "gpt2_data", shard_size=64)
    return tmp_path / "gpt2_data"


def test_shards_record_their_tokenizer_and_are_refused_for_a_model_with_another(tmp_path):
    from loaders.tokens import HEADER, DataLoaderLite
    from tokenization import load_tokenizer
    from tokenization.tokenizer import tokenizer_fingerprint
    from tools.errors import UserError
    data = gpt2_shards(tmp_path)
    header = json.loads((data / HEADER).read_text())
    assert header == {"tokenizer": "gpt2", "tokenizer_fingerprint": tokenizer_fingerprint(load_tokenizer()),
                      "vocab_size": 50257, "source": "files"}
    assert not [n for n in os.listdir(data) if n.endswith(".tmp")]  # written atomically, no temp file left
    loader = DataLoaderLite(str(data), B=2, T=8)
    assert all(path.endswith(".npy") for path in loader.shards)  # shards.json is not read as a shard
    other = make_hf_tokenizer_folder(tmp_path / "tok", 100)
    remake = f"python fineweb.py --source files FILES... --tokenizer {other} --out_dir {data}_tok"
    with pytest.raises(UserError, match=f"{data} was tokenized with gpt2, another tokenizer than the model's "
                                        rf"\({other}\): .*{re.escape(remake)}$"):
        loader.check_tokenizer(other)
    loader.check_tokenizer("gpt2")  # the same tokenizer, and a model from scratch, pass
    loader.check_tokenizer(None)
    os.remove(data / HEADER)  # shards of an older fineweb.py: the vocabulary check only
    DataLoaderLite(str(data), B=2, T=8).check_tokenizer(other)


def test_a_folder_holding_another_tokenizers_shards_takes_none_of_this_one(tmp_path):
    data = gpt2_shards(tmp_path)
    docs = tmp_path / "w.jsonl"
    docs.write_text('{"text": "w5 w7 w9"}\n')
    tok = make_hf_tokenizer_folder(tmp_path / "tok", 100)
    with pytest.raises(fineweb.UserError, match="holds shards made with gpt2, another tokenizer than this run's"):
        fineweb.prepare("files", [str(docs)], out_dir=data, prefix="other", shard_size=64, tokenizer=tok)
    assert not [n for n in os.listdir(data) if n.startswith("other")]


def test_train_refuses_gpt2_shards_for_a_model_with_another_tokenizer_though_the_ids_fit(tmp_path, monkeypatch):
    import shutil
    from model import GPT, GPTConfig
    from test_train import run_train, tiny_flags
    data = gpt2_shards(tmp_path)
    GPT(GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path / "m")
    shutil.copy(make_hf_tokenizer_folder(tmp_path / "tok", 100) / "tokenizer.json", tmp_path / "m")
    flags = dict(data_dir=data, init_from=tmp_path / "m", vocab_size=50304, n_layer=1, n_head=2, n_embd=16,
                 batch_size=1, total_batch_size=16, max_steps=1)
    with pytest.raises(ValueError, match="was tokenized with gpt2, another tokenizer than the model's"):
        run_train(tiny_flags(tmp_path, **flags), monkeypatch)
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_a_damaged_shards_json_is_named_and_shards_of_an_unknown_tokenizer_get_none(tmp_path, capsys):
    from loaders.tokens import HEADER, DataLoaderLite
    data = gpt2_shards(tmp_path)
    (data / HEADER).write_text('{"tokenizer": "gp')
    with pytest.raises(fineweb.UserError, match=f"{HEADER} is not valid JSON .*remake the shards with fineweb.py"):
        DataLoaderLite(str(data), B=2, T=8)
    os.remove(data / HEADER)
    np.save(data / "old_train_000001.npy", np.arange(100, dtype=np.uint16))  # an older run's, tokenizer unknown
    docs = tmp_path / "more.jsonl"
    docs.write_text('{"text": "more text"}\n')
    fineweb.prepare("files", [str(docs)], out_dir=data, prefix="more", shard_size=64)
    assert not (data / HEADER).exists() and "shards of an unknown tokenizer" in capsys.readouterr().err
