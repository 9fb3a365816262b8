"""No run destroys another, no silent wrong result: each refusal names the bad thing and leaves every file
byte-identical; faults (a diverging update, SIGKILL in the middle of a write) leave the last checkpoint whole."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import training.checkpoint as checkpoint
from tools.atomic import remove_stale_temps
from conftest import subprocess_env
from model import GPT, GPTConfig, LLaMA, LLaMAConfig
from test_train import ROOT, VOCAB, read_log, run_train, tiny_flags, write_shards


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`: 'untouched' means an equal snapshot afterwards. The
    out_dir's .lock is left out: a run holds it while its process lives (the tests run train.py in theirs)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*"))
            if p.is_file() and p.name != ".lock"}


def strict_json_lines(path):
    """The records of a jsonl file, refusing NaN/Infinity (which strict JSON parsers reject)."""
    def refuse(constant):
        raise ValueError(f"{path}: non-standard JSON constant {constant}")
    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 3-step run in out/ (ckpt.pt, log.jsonl) on tiny shards in data/."""
    tmp = tmp_path_factory.mktemp("run")
    write_shards(tmp / "data")
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_train(tiny_flags(tmp, max_steps=3, eval_interval=0), monkeypatch)
    return tmp


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """tmp_path with its own copy of finished_run's data/ and out/, for a test to run commands against."""
    for name in ("data", "out"):
        shutil.copytree(finished_run / name, tmp_path / name)
    return tmp_path


def flags(tmp_path, **overrides):
    return tiny_flags(tmp_path, **{"max_steps": 3, "eval_interval": 0, **overrides})


# --- out_dir ownership -------------------------------------------------------------------------------------------
def test_new_run_refuses_an_out_dir_holding_another_run_and_gives_the_commands_that_proceed(run_copy, monkeypatch):
    before = snapshot(run_copy / "out")
    with pytest.raises(ValueError, match=r"holds another run \(ckpt.pt, log.jsonl\)") as refusal:
        run_train(flags(run_copy), monkeypatch)
    assert "--init_from=resume" in str(refusal.value) and "--overwrite=True" in str(refusal.value)
    assert snapshot(run_copy / "out") == before


def test_overwrite_replaces_the_previous_run_in_out_dir(run_copy, monkeypatch):
    run_train(flags(run_copy, max_steps=2, overwrite=True), monkeypatch)
    assert [r["step"] for r in read_log(run_copy / "out")] == [0, 1]  # the old run's records are gone
    assert checkpoint.read_checkpoint(run_copy / "out")["step"] == 2


def test_run_refuses_the_out_dir_it_loads_its_base_from_even_with_overwrite(run_copy, monkeypatch):
    before = snapshot(run_copy / "out")
    with pytest.raises(ValueError, match="holds the model this run loads"):
        run_train(flags(run_copy, init_from=run_copy / "out", peft_method="lora", lora_r=4, overwrite=True), monkeypatch)
    assert snapshot(run_copy / "out") == before


def test_fine_tune_refuses_an_architecture_flag_its_loaded_model_does_not_have(run_copy, monkeypatch):
    with pytest.raises(ValueError, match=r"n_layer=3 \(the model has 2\): a loaded model keeps its architecture"):
        run_train(flags(run_copy, init_from=run_copy / "out", out_dir=run_copy / "fine", n_layer=3), monkeypatch)
    assert snapshot(run_copy / "fine") == {}  # nothing written


# --- resume ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changed", [{"n_layer": 3}, {"peft_method": "lora", "lora_r": 4, "lora_targets": "c_proj"}], ids=["model", "lora"])
def test_resume_refuses_a_changed_model_or_lora_flag_by_name(run_copy, monkeypatch, changed):
    before = snapshot(run_copy / "out")
    name = next(iter(changed))
    with pytest.raises(ValueError, match=f"{name}=.*the checkpoint has.*cannot change on resume"):
        run_train(flags(run_copy, init_from="resume", max_steps=5, **changed), monkeypatch)
    assert snapshot(run_copy / "out") == before


def test_resume_takes_the_runs_settings_from_the_checkpoint_and_applies_a_new_max_steps(run_copy, monkeypatch,
                                                                                        capsys):
    # no config file, no model flags: the checkpoint's n_layer=2, data_dir, batch sizes ... come back
    run_train([f"--out_dir={run_copy / 'out'}", "--init_from=resume", "--max_steps=4", "--compile=False",
               "--device=cpu"], monkeypatch)
    assert "applying max_steps=4 (was 3)" in capsys.readouterr().out
    assert [r["step"] for r in read_log(run_copy / "out")] == [0, 1, 2, 3]
    assert checkpoint.load_model(run_copy / "out").config.n_layer == 2


def test_resume_cuts_the_log_back_to_the_checkpoint_step(run_copy, monkeypatch):
    with open(run_copy / "out" / "log.jsonl", "a") as f:  # a run killed after logging steps its checkpoint lacks
        f.write('{"step": 3, "train_loss": 1.0}\n{"step": 4, "train_lo')  # the last line torn by the kill
    run_train(flags(run_copy, init_from="resume", max_steps=4), monkeypatch)
    assert [r["step"] for r in read_log(run_copy / "out")] == [0, 1, 2, 3]


def test_resume_of_a_finished_run_without_more_steps_is_refused(run_copy, monkeypatch):
    with pytest.raises(ValueError, match="already trained to step 3 and max_steps=3: pass a larger --max_steps"):
        run_train(flags(run_copy, init_from="resume"), monkeypatch)


def test_lora_resume_refuses_a_base_replaced_by_another_of_the_same_shape(run_copy, monkeypatch):
    lora = dict(init_from=run_copy / "out", peft_method="lora", lora_r=4, out_dir=run_copy / "lora")
    run_train(flags(run_copy, max_steps=2, **lora), monkeypatch)
    run_train(flags(run_copy, overwrite=True, seed=7), monkeypatch)  # another base, same shape, same out_dir
    before = snapshot(run_copy / "lora")
    with pytest.raises(ValueError, match="has changed since this peft_method='lora' run started"):
        run_train(flags(run_copy, init_from="resume", out_dir=run_copy / "lora", max_steps=4), monkeypatch)
    assert snapshot(run_copy / "lora") == before


def test_init_from_a_lora_out_dir_fine_tunes_its_merged_weights(run_copy, monkeypatch):
    run_train(flags(run_copy, max_steps=2, init_from=run_copy / "out", peft_method="lora", lora_r=4, out_dir=run_copy / "lora"),
              monkeypatch)
    # one full fine-tuning step at a negligible lr: the new checkpoint is the LoRA model with its B A merged in
    run_train(flags(run_copy, max_steps=1, init_from=run_copy / "lora", out_dir=run_copy / "full", max_lr=1e-12,
                    min_lr=0.0), monkeypatch)
    saved = checkpoint.read_checkpoint(run_copy / "full")
    assert saved["lora"] is None and not any(".lora_" in k for k in saved["model"])
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        lora_logits = checkpoint.load_model(run_copy / "lora").eval()(idx)[0]
        full_logits = checkpoint.load_model(run_copy / "full").eval()(idx)[0]
    assert (full_logits - lora_logits).abs().max() < 1e-4


# --- non-finite updates ------------------------------------------------------------------------------------------
def test_nan_gradient_with_a_finite_loss_is_never_applied_nor_saved(tmp_path, monkeypatch, capsys):
    write_shards(tmp_path / "data")
    real_forward, calls = GPT.forward, {"n": 0}

    def forward_with_nan_gradient(self, idx, targets=None, kv_cache=None):
        logits, loss = real_forward(self, idx, targets, kv_cache)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 2 * 2:  # from step 2 on: + 0 * sqrt(0 * w) is 0 forward, but its gradient is 0 * inf
                loss = loss + 0.0 * torch.sqrt(0.0 * self.lm_head.weight.sum())
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward_with_nan_gradient)
    with pytest.raises(SystemExit) as stop:
        run_train(flags(tmp_path, checkpoint_interval=1, max_steps=4), monkeypatch)
    assert stop.value.code == 1
    out = capsys.readouterr().out
    assert "step 2: the loss is 4." in out and "gradient norm nan: stopping without applying this update" in out
    saved = checkpoint.read_checkpoint(tmp_path / "out")
    assert saved["step"] == 2 and all(torch.isfinite(t).all() for t in saved["model"].values())
    assert [r["step"] for r in strict_json_lines(tmp_path / "out" / "log.jsonl")] == [0, 1]


# --- values validated where they enter ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad, message", [
    ({"total_batch_size": 0}, "total_batch_size=0 is not valid: it must be a positive int"),
    ({"peft_method": "lora", "lora_r": -2}, r"lora_r=-2 is not valid: it must be a positive int"),
    ({"max_steps": 0}, "max_steps=0 is not valid"),
    ({"batch_size": -1}, "batch_size=-1 is not valid"),
    ({"eval_iters": 0}, "eval_iters=0 is not valid"),
    ({"sample_interval": 1, "sample_prompt": ""}, "sample_prompt='' is empty"),
    ({"n_embd": 30, "n_head": 4}, "n_embd=30 is not divisible by n_head=4"),
    ({"max_lr": float("nan")}, "max_lr=nan is not valid"),
    ({"parallel": "zero3"}, "parallel='zero3' is not valid: it must be one of 'ddp', 'fsdp'"),
    ({"parallel": "fsdp", "dtype": "float16"}, "dtype='float16' with parallel='fsdp'"),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else None)
def test_bad_config_value_is_refused_by_name_before_anything_is_written(tmp_path, monkeypatch, bad, message):
    write_shards(tmp_path / "data")
    with pytest.raises(ValueError, match=message):
        run_train(flags(tmp_path, **bad), monkeypatch)
    assert not (tmp_path / "out").exists()


def test_bad_regex_in_a_config_files_lora_targets_is_refused_by_name(tmp_path, monkeypatch):
    config_file = tmp_path / "lora.py"
    config_file.write_text('peft_method = "lora"\nlora_targets = "re:c_attn("\n')  # re: marks a regex
    with pytest.raises(ValueError, match=r"lora_targets='re:c_attn\(' is not valid: .*'re:<valid regex>'"):
        run_train([str(config_file), *flags(tmp_path)], monkeypatch)


def test_shard_token_ids_outside_the_models_vocabulary_are_refused(tmp_path, monkeypatch):
    write_shards(tmp_path / "data")  # ids up to 127
    with pytest.raises(ValueError, match=r"holds token id 12\d, outside the model's vocabulary \[0, 100\)"):
        run_train(flags(tmp_path, vocab_size=100), monkeypatch)


# --- files checked against their format --------------------------------------------------------------------------
def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def tiny_gpt_folder(folder):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16))
    model.save_pretrained(folder)
    return model


def tiny_adapter(tmp_path):
    from lora import LoRAConfig, apply_lora, save_adapter
    model = apply_lora(tiny_gpt_folder(tmp_path / "base"), LoRAConfig(r=2, targets=("c_attn",)))
    return save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))


def test_truncated_checkpoint_names_the_file_and_never_advises_unsafe_loading(run_copy, monkeypatch):
    truncate(run_copy / "out" / "ckpt.pt")
    with pytest.raises(ValueError, match=r"ckpt.pt is not a readable checkpoint") as refusal:
        run_train(flags(run_copy, init_from="resume", max_steps=5), monkeypatch)
    assert "weights_only=False" not in str(refusal.value)


def test_truncated_model_safetensors_names_the_file(tmp_path):
    tiny_gpt_folder(tmp_path / "hf")
    truncate(tmp_path / "hf" / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file"):
        checkpoint.load_model(tmp_path / "hf")


def test_truncated_adapter_weights_name_the_file(tmp_path):
    adapter = tiny_adapter(tmp_path)
    truncate(adapter / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"adapter_model.safetensors is not a readable safetensors file"):
        checkpoint.load_model(adapter)


def test_adapter_config_without_r_is_refused_by_name(tmp_path):
    adapter = tiny_adapter(tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["r"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r'adapter_config.json: "r" must be a positive int .* \(missing\)'):
        checkpoint.load_model(adapter)


def test_binary_file_given_as_a_config_file_or_hellaswag_file_is_refused_by_name(tmp_path):
    import evals.hellaswag as eval_hellaswag
    from configurator import configure
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=f"config file '{binary}' is not a text file"):
        configure({"batch_size": 1}, [str(binary)])
    with pytest.raises(ValueError, match=f"{binary} is not a text file"):
        eval_hellaswag.load_examples(binary)


def test_hellaswag_on_a_llama_without_tokenizer_json_is_refused(tmp_path):
    import eval_hellaswag
    from test_hellaswag import EXAMPLES, write_jsonl
    LLaMA(LLaMAConfig(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, max_seq_len=64)).save_pretrained(tmp_path / "m")
    jsonl = write_jsonl(tmp_path / "hellaswag.jsonl", EXAMPLES)
    with pytest.raises(ValueError, match="a model folder without tokenizer.json; copy the checkpoint's tokenizer.json"):
        eval_hellaswag.main(["--model", str(tmp_path / "m"), "--file", str(jsonl), "--device", "cpu"])


# --- how errors and files come out -------------------------------------------------------------------------------
@pytest.mark.slow  # starts processes
def test_user_error_is_one_line_without_traceback_and_debug_shows_the_traceback(tmp_path):
    argv = [sys.executable, "train.py", "--batch_size=0", f"--out_dir={tmp_path / 'out'}"]
    plain = subprocess.run(argv, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1
    assert plain.stderr.splitlines() == [plain.stderr.strip()] and plain.stderr.startswith("error: batch_size=0 ")
    debug = subprocess.run([*argv, "--debug"], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True,
                           timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "batch_size=0" in debug.stderr


def test_checkpoint_adapter_and_merged_files_get_the_permissions_the_umask_gives(run_copy, monkeypatch):
    old = os.umask(0o022)
    try:
        run_train(flags(run_copy, max_steps=1, init_from=run_copy / "out", out_dir=run_copy / "lora", peft_method="lora", lora_r=2,
                        merge_on_save=True), monkeypatch)
    finally:
        os.umask(old)
    files = [p for p in (run_copy / "lora").rglob("*") if p.is_file()]
    assert {p.relative_to(run_copy / "lora").as_posix() for p in files} >= {
        "ckpt.pt", "adapter/adapter_model.safetensors", "adapter/adapter_config.json", "merged/model.safetensors"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}


# --- SIGKILL in the middle of writes -----------------------------------------------------------------------------
def kill_during_writes(write, check, kills=30, seed=0):
    """Fork a child that calls write(1), write(2), ... without end; SIGKILL it after a random delay; check() the
    files. Returns how many kills left a temp file behind (a kill in the middle of a write)."""
    rng, interrupted = random.Random(seed), 0
    for _ in range(kills):
        pid = os.fork()
        if pid == 0:  # the child: writes until it is killed
            try:
                version = 1
                while True:
                    write(version)
                    version += 1
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.01))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        check()
        interrupted += bool(remove_stale_temps(write.folder))
    return interrupted


def test_sigkill_during_checkpoint_writes_always_leaves_a_whole_loadable_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    optimizer = torch.optim.AdamW(model.parameters())

    def write(version):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(version)
        checkpoint.save_checkpoint(tmp_path, model, optimizer, version, {}, {"shard": 0, "position": 0})
    write.folder = tmp_path

    def check():
        saved = checkpoint.read_checkpoint(tmp_path)
        assert all(torch.all(t == saved["step"]) for t in saved["model"].values())  # one whole version

    write(0)
    assert kill_during_writes(write, check) > 0  # some kills did land mid-write
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_sigkill_during_adapter_writes_always_leaves_a_whole_loadable_adapter(tmp_path):
    from lora import LoRAConfig, apply_lora, load_adapter, lora_layers, save_adapter
    torch.manual_seed(0)
    model = apply_lora(GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8)),
                       LoRAConfig(r=2, targets=("c_attn",)))

    def write(version):
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.fill_(version)
        save_adapter(model, tmp_path)
    write.folder = tmp_path

    def check():
        loaded = apply_lora(GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8)),
                            LoRAConfig(r=2, targets=("c_attn",)))
        load_adapter(loaded, tmp_path)
        values = {v for _, layer in lora_layers(loaded) for v in layer.lora_B.flatten().tolist()}
        assert len(values) == 1  # one whole version

    write(0)
    assert kill_during_writes(write, check) > 0
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.fixture
def one_thread():
    """torch on one thread in this process, as in the children subprocess_env() starts: the same sums, bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_training_killed_mid_run_resumes_to_the_losses_of_an_uninterrupted_run(tmp_path, monkeypatch, one_thread):
    write_shards(tmp_path / "data")
    run_flags = dict(max_steps=8, checkpoint_interval=1, dropout=0.1)
    run_train(flags(tmp_path, out_dir=tmp_path / "whole", **run_flags), monkeypatch)
    env = {**subprocess_env(), "PYTHONUNBUFFERED": "1"}
    killed = subprocess.Popen([sys.executable, "train.py", *flags(tmp_path, out_dir=tmp_path / "killed", **run_flags)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in killed.stdout:
        if line.startswith("step     2 |"):  # killed somewhere between logging step 2 and finishing step 3
            break
    killed.kill()
    killed.wait()
    killed.stdout.close()
    stale = tmp_path / "killed" / ".ckpt.pt.a1b2c3d4.tmp"
    stale.write_bytes(b"the first bytes of a checkpoint")  # what a kill in the middle of torch.save leaves
    run_train(flags(tmp_path, out_dir=tmp_path / "killed", init_from="resume", **run_flags), monkeypatch)
    assert not stale.exists()
    whole, resumed = read_log(tmp_path / "whole"), read_log(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(8))
    assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in whole]  # bit for bit
