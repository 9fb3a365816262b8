"""Our hand-written GPT-2 against transformers' GPT2LMHeadModel, and its basic contracts."""
import math

import pytest
import torch

from model import GPT, GPTConfig, load_pretrained
from training.optim import configure_adamw

transformers = pytest.importorskip("transformers")


def make_hf_gpt2(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=kw.get("vocab_size", 101), n_positions=32, n_embd=48, n_layer=2,
                                  n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    hf.save_pretrained(tmp_path)
    return hf


def test_hf_checkpoint_loads_with_identical_logits(tmp_path):
    hf = make_hf_gpt2(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        ref = hf(idx).logits
        logits, _ = ours(idx)
    assert (logits - ref).abs().max().item() < 1e-4


def test_pytorch_model_bin_checkpoint_loads(tmp_path):
    hf = make_hf_gpt2(tmp_path)
    # older checkpoints are pickled state dicts: rewrite this one that way
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4


def test_save_pretrained_loads_in_transformers(tmp_path):
    torch.manual_seed(1)
    ours = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    ours.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4


def test_load_pretrained_dispatches_on_model_type(tmp_path):
    make_hf_gpt2(tmp_path)
    assert isinstance(load_pretrained(tmp_path), GPT)


def test_llama_folder_is_refused_by_gpt_with_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="model_type='llama'"):
        GPT.from_pretrained(tmp_path)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        GPT.from_pretrained(tmp_path / "nope" / "deeper")


def test_missing_weights_file_is_a_clear_error(tmp_path):
    make_hf_gpt2(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights found"):
        GPT.from_pretrained(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    make_hf_gpt2(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["transformer.h.1.mlp.c_fc.weight"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing \(1\): transformer.h.1.mlp.c_fc.weight"):
        GPT.from_pretrained(tmp_path)


def test_module_names_match_hugging_face(tmp_path):
    hf = make_hf_gpt2(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    hf_names = {k for k in hf.state_dict() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert set(ours.state_dict()) == hf_names


def test_gpt2_124m_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    # 124M at the padded vocab 50304 (wte counted once, tied with lm_head); nanoGPT/build-nanogpt's number
    assert model.num_params() == 124_475_904


def test_optimizer_groups_for_gpt2_124m(capsys):
    with torch.device("meta"):
        model = GPT(GPTConfig())
    configure_adamw(model, 0.1, 6e-4, (0.9, 0.95), "cpu")
    out = capsys.readouterr().out
    assert "num decayed parameter tensors: 50, with 124,354,560 parameters" in out
    assert "num non-decayed parameter tensors: 98, with 121,344 parameters" in out


def test_loss_at_init_is_about_log_vocab():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=1000, n_layer=2, n_head=4, n_embd=64))
    idx = torch.randint(0, 1000, (4, 64))
    _, loss = model(idx, torch.randint(0, 1000, (4, 64)))
    # a fresh model predicts ~uniformly: cross-entropy ~ ln(vocab)
    assert abs(loss.item() - math.log(1000)) < 0.1


def test_targets_of_minus_one_are_ignored():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, 50, (1, 8))
    targets = idx.clone()
    targets[0, :4] = -1
    _, loss = model(idx, targets)
    logits, _ = model(idx)  # (1, 8, V): with targets the model returns no logits
    expected = torch.nn.functional.cross_entropy(logits[0, 4:], idx[0, 4:])  # hand-picked unmasked positions
    assert torch.allclose(loss, expected)


def test_lm_head_is_tied_to_token_embedding():
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16))
    assert model.lm_head.weight is model.transformer.wte.weight


def test_hub_name_is_found_in_the_local_hugging_face_cache(tmp_path, monkeypatch):
    # the cache layout huggingface_hub writes: models--{org}--{name}/snapshots/{commit}/ and refs/main
    repo = tmp_path / "hub" / "models--openai-community--gpt2"
    hf = make_hf_gpt2(repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # no local folder named "gpt2"
    ours = GPT.from_pretrained("gpt2").eval()
    idx = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4


def test_sharded_safetensors_checkpoint_loads(tmp_path):
    hf = make_hf_gpt2(tmp_path / "full")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours = GPT.from_pretrained(tmp_path / "sharded").eval()
    idx = torch.randint(0, 101, (1, 9))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4
