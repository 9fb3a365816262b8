"""LoRA (and LLaMA) fine-tuning through train.py, checked against transformers, PEFT and the untouched base."""
import json

import numpy as np
import pytest
import torch

import training.checkpoint as checkpoint
from model import GPT, LLaMA
from test_train import VOCAB, read_log, run_train, tiny_flags, write_shards

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def hf_gpt2_base(tmp_path_factory):
    """A GPT-2 pretrained (briefly, by train.py) on counting by 1, exported as a Hugging Face folder.

    A LoRA test needs a trained base: on a random one, the frozen tied embedding caps how far any adapter
    can push the logits, and the data to adapt to (counting by 3) must be new to the base."""
    tmp = tmp_path_factory.mktemp("base")
    write_shards(tmp / "data", stride=1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_train(tiny_flags(tmp, max_steps=40, eval_interval=0), monkeypatch)
    checkpoint.load_model(tmp / "out").save_pretrained(tmp / "hf")
    return tmp / "hf"


def lora_flags(tmp_path, base, **overrides):
    flags = dict(init_from=str(base), peft_method="lora", lora_r=4, lora_alpha=8.0, lora_targets=("c_attn", "c_proj", "c_fc"),
                 max_steps=20, eval_interval=0, max_lr=1e-2, min_lr=1e-3, merge_on_save=True)
    flags.update(overrides)
    return tiny_flags(tmp_path, **flags)


def test_lora_run_lowers_the_loss_and_leaves_every_base_weight_bit_identical(tmp_path, monkeypatch, hf_gpt2_base):
    write_shards(tmp_path / "data", stride=3)
    run = run_train(lora_flags(tmp_path, hf_gpt2_base, merge_on_save=False), monkeypatch)  # merging changes W
    losses = [r["train_loss"] for r in read_log(tmp_path / "out")]
    assert np.mean(losses[-5:]) < losses[0] - 0.3
    saved = checkpoint.read_checkpoint(tmp_path / "out")
    assert saved["model"] and all(".lora_" in k for k in saved["model"])  # a LoRA checkpoint holds the adapter only
    # the model that trained, in memory (a model rebuilt from the checkpoint would reload the base from the folder)
    base = GPT.from_pretrained(hf_gpt2_base)
    trained_sd = run["raw_model"].state_dict()
    for name, tensor in base.state_dict().items():
        assert torch.equal(trained_sd[name], tensor), name
    assert any(trained_sd[k].abs().sum() > 0 for k in trained_sd if k.endswith("lora_B"))


def test_saved_adapter_reloads_to_the_same_logits_in_ours_and_in_peft(tmp_path, monkeypatch, hf_gpt2_base):
    write_shards(tmp_path / "data", stride=3)
    run_train(lora_flags(tmp_path, hf_gpt2_base), monkeypatch)
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        expected = checkpoint.load_model(tmp_path / "out").eval()(idx)[0]
        from_adapter = checkpoint.load_model(tmp_path / "out" / "adapter").eval()(idx)[0]
        hf = transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2_base)
        peft_logits = peft.PeftModel.from_pretrained(hf, tmp_path / "out" / "adapter").eval()(idx).logits
        merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out" / "merged").eval()(idx).logits
    assert (from_adapter - expected).abs().max() < 1e-5
    assert (peft_logits - expected).abs().max() < 1e-4
    assert (merged - expected).abs().max() < 1e-4
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(hf_gpt2_base)


def whole_and_resumed_losses(tmp_path, monkeypatch, base, **flags):
    """train_loss per step of a 6-step LoRA run, and of the same run killed after its step-3 checkpoint, resumed."""
    write_shards(tmp_path / "data", stride=3)
    run_train(lora_flags(tmp_path, base, out_dir=tmp_path / "whole", max_steps=6, **flags), monkeypatch)
    real_save = checkpoint.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # killed right after the step-3 checkpoint

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_train(lora_flags(tmp_path, base, out_dir=tmp_path / "crash", max_steps=6, checkpoint_interval=3, **flags),
                  monkeypatch)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    run_train(lora_flags(tmp_path, base, out_dir=tmp_path / "crash", max_steps=6, init_from="resume", **flags),
              monkeypatch)
    return [[r["train_loss"] for r in read_log(tmp_path / run)] for run in ("whole", "crash")]


VARIANTS = dict(lora_use_dora=True, lora_init="pissa_niter_2", lora_loraplus_lr_ratio=4.0)  # DoRA + PiSSA + LoRA+


@pytest.mark.parametrize("variant", [{}, VARIANTS], ids=["lora", "dora-pissa-loraplus"])
def test_lora_run_resumes_with_the_same_losses(tmp_path, monkeypatch, hf_gpt2_base, variant):
    whole, resumed = whole_and_resumed_losses(tmp_path, monkeypatch, hf_gpt2_base, **variant)
    assert resumed == whole


def test_dora_pissa_loraplus_run_saves_an_adapter_peft_loads_on_the_original_base(tmp_path, monkeypatch,
                                                                                  hf_gpt2_base):
    write_shards(tmp_path / "data", stride=3)
    run_train(lora_flags(tmp_path, hf_gpt2_base, max_steps=4, **VARIANTS), monkeypatch)
    trained = checkpoint.load_model(tmp_path / "out").eval()
    assert trained.lora_config.use_dora and trained.lora_config.init == "pissa_niter_2"
    assert trained.lora_config.loraplus_lr_ratio == 4.0
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        hf = transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2_base)
        peft_logits = peft.PeftModel.from_pretrained(hf, tmp_path / "out" / "adapter").eval()(idx).logits
        assert (peft_logits - trained(idx)[0]).abs().max() < 1e-4
    groups = checkpoint.read_checkpoint(tmp_path / "out")["optimizer"]["param_groups"]
    assert [g["lr"] / groups[0]["lr"] for g in groups] == [1.0, 4.0, 4.0]  # lora_A | lora_B | magnitudes
    assert [len(g["params"]) for g in groups] == [4 * 2] * 3  # c_attn, both c_proj, c_fc in 2 blocks


def test_full_fine_tune_from_a_hugging_face_folder_trains_every_weight(tmp_path, monkeypatch, hf_gpt2_base):
    write_shards(tmp_path / "data")
    run_train(tiny_flags(tmp_path, init_from=str(hf_gpt2_base), max_steps=3, eval_interval=0), monkeypatch)
    trained, base = checkpoint.load_model(tmp_path / "out"), GPT.from_pretrained(hf_gpt2_base)
    changed = [k for k, v in base.state_dict().items() if not torch.equal(trained.state_dict()[k], v)]
    assert len(changed) == len(base.state_dict())


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """A tiny LLaMA (grouped-query attention) trained from scratch by train.py, also exported for Hugging Face."""
    tmp = tmp_path_factory.mktemp("llama")
    write_shards(tmp / "data", stride=1)
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_train(tiny_flags(tmp, model_type="llama", n_head=4, n_kv_head=2, max_steps=40, eval_interval=0), monkeypatch)
    checkpoint.load_model(tmp / "out").save_pretrained(tmp / "hf")
    return tmp


def test_llama_trains_from_scratch(llama_run):
    losses = [r["train_loss"] for r in read_log(llama_run / "out")]
    assert losses[0] == pytest.approx(np.log(VOCAB), abs=0.3)
    assert np.mean(losses[-5:]) < losses[0] - 1.0
    model = checkpoint.load_model(llama_run / "out")
    assert isinstance(model, LLaMA) and model.config.n_kv_head == 2


def test_lora_fine_tune_of_a_hugging_face_llama_loads_in_peft(tmp_path, monkeypatch, capsys, llama_run):
    write_shards(tmp_path / "data", stride=3)
    run_train(lora_flags(tmp_path, llama_run / "hf", lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
                         merge_on_save=False, n_head=4, n_kv_head=2), monkeypatch)
    losses = [r["train_loss"] for r in read_log(tmp_path / "out")]
    assert np.mean(losses[-5:]) < losses[0] - 0.3
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        ours = checkpoint.load_model(tmp_path / "out").eval()(idx)[0]
        hf = transformers.LlamaForCausalLM.from_pretrained(llama_run / "hf")
        theirs = peft.PeftModel.from_pretrained(hf, tmp_path / "out" / "adapter").eval()(idx).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_llama_run_prints_samples_with_the_checkpoints_own_tokenizer(tmp_path, monkeypatch, capsys, llama_run):
    import shutil
    from test_fineweb import make_hf_tokenizer_folder
    shutil.copytree(llama_run / "hf", tmp_path / "llama")
    make_hf_tokenizer_folder(tmp_path / "tok", n_words=100)  # ids 0..101 fit the 128-token model
    shutil.copy(tmp_path / "tok" / "tokenizer.json", tmp_path / "llama" / "tokenizer.json")
    write_shards(tmp_path / "data", stride=3)
    run_train(lora_flags(tmp_path, tmp_path / "llama", lora_targets=("q_proj", "v_proj"), max_steps=2, n_head=4,
                         sample_interval=1, sample_prompt="w5 w6", merge_on_save=False), monkeypatch)
    assert "sample 0: '<s> w5 w6" in capsys.readouterr().out
