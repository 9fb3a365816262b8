"""AdaLoRA, prompt, P-tuning and prefix tuning through train.py: the base stays frozen, the adapter folder loads
in PEFT with the same logits and in ours through checkpoint.load_model, and a resumed run repeats the losses.
(That training lowers the loss, for every method, is what bench/peft_methods.py measures.)"""
import warnings

import pytest
import torch

import training.checkpoint as checkpoint
from model import GPT
from test_train import read_log, run_train, run_until_the_first_checkpoint, tiny_flags, write_shards
from test_train_lora import hf_gpt2_base  # noqa: F401  (the trained base fixture)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

METHOD_FLAGS = {
    "adalora": dict(adalora_init_r=4, adalora_target_r=2, adalora_tinit=2, adalora_tfinal=2, lora_alpha=8.0,
                    lora_targets='("c_attn","c_fc")'),
    # the base has 16 positions: 4 virtual + 12 tokens
    "prompt": dict(num_virtual_tokens=4, prompt_init="sample_vocab", block_size=12, batch_size=2, total_batch_size=48),
    "ptuning": dict(num_virtual_tokens=4, encoder_type="LSTM", encoder_hidden_size=16, block_size=12, batch_size=2,
                    total_batch_size=48),
    "prefix": dict(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=16, block_size=12, batch_size=2,
                   total_batch_size=48),
}


def peft_flags(tmp_path, base, method, **overrides):
    flags = dict(init_from=str(base), peft_method=method, max_steps=8, eval_interval=0, max_lr=1e-2, min_lr=1e-3,
                 **METHOD_FLAGS[method])
    flags.update(overrides)
    return tiny_flags(tmp_path, **flags)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHOD_FLAGS))
def test_adapter_run_trains_only_its_adapter_and_loads_in_peft_and_ours(method, tmp_path, monkeypatch, hf_gpt2_base):
    write_shards(tmp_path / "data", stride=3)
    run_train(peft_flags(tmp_path, hf_gpt2_base, method), monkeypatch)
    saved = checkpoint.read_checkpoint(tmp_path / "out")
    assert saved["peft"]["method"] == method and saved["base"] == str(hf_gpt2_base)
    assert not any(k.startswith("transformer.") and ".lora_" not in k for k in saved["model"])  # no base weights
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        from_ckpt = checkpoint.load_model(tmp_path / "out")(idx)[0]
        from_adapter = checkpoint.load_model(tmp_path / "out" / "adapter")(idx)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2_base)
            in_peft = peft.PeftModel.from_pretrained(hf, tmp_path / "out" / "adapter").eval()(input_ids=idx).logits
    torch.testing.assert_close(from_adapter, from_ckpt, rtol=0, atol=1e-5)
    torch.testing.assert_close(in_peft[:, -idx.size(1):], from_ckpt, rtol=0, atol=1e-5)
    base = GPT.from_pretrained(hf_gpt2_base)
    assert not torch.allclose(base(idx)[0], from_ckpt, atol=1e-3)


@pytest.mark.parametrize("method", ["adalora", "prefix"])
def test_adapter_run_resumes_with_the_same_losses(method, tmp_path, monkeypatch, hf_gpt2_base):
    write_shards(tmp_path / "data", stride=3)
    run_train(peft_flags(tmp_path, hf_gpt2_base, method, out_dir=tmp_path / "whole"), monkeypatch)
    run_until_the_first_checkpoint(peft_flags(tmp_path, hf_gpt2_base, method, out_dir=tmp_path / "split",
                                              checkpoint_interval=4), monkeypatch)
    run_train(peft_flags(tmp_path, hf_gpt2_base, method, out_dir=tmp_path / "split", init_from="resume"), monkeypatch)
    whole = [r["train_loss"] for r in read_log(tmp_path / "whole")]
    split = [r["train_loss"] for r in read_log(tmp_path / "split")]
    assert split == pytest.approx(whole, rel=1e-6, abs=1e-6)
