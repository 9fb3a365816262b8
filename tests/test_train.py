"""train.py end to end on tiny models: DDP equivalence, resume, NaN stop, and the accumulation arithmetic."""
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import training.checkpoint as checkpoint
from conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 128


def write_shards(data_dir, n_train=40_000, n_val=4_000, seed=0, stride=1):
    """Token shards with structure to learn: noisy counting by `stride` mod 96 (build-nanogpt file names)."""
    rng = np.random.default_rng(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    for split, n, idx in (("val", n_val, 0), ("train", n_train, 1)):
        tokens = (np.arange(n) * stride % 96 + (rng.random(n) < 0.1) * rng.integers(0, 32, n)) % VOCAB
        np.save(data_dir / f"tiny_{split}_{idx:06d}.npy", tokens.astype(np.uint16))
    return data_dir


def tiny_flags(tmp_path, **overrides):
    flags = dict(out_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "data"), device="cpu", dtype="float32",
                 compile=False, n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=VOCAB, batch_size=4,
                 total_batch_size=4 * 16 * 2, max_steps=6, warmup_steps=2, max_lr=1e-2, min_lr=1e-3,
                 eval_interval=3, eval_iters=2, sample_interval=0, checkpoint_interval=0, log_interval=1)
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items()]


def run_train(argv, monkeypatch):
    """train.py in this process (fast: no new interpreter), as `python train.py ARGV` would run it."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    monkeypatch.chdir(ROOT)
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    return runpy.run_path(str(ROOT / "train.py"), run_name="__main__")  # the run's globals


def run_until_the_first_checkpoint(argv, monkeypatch):
    """train.py ARGV, stopped (KeyboardInterrupt) right after it has written its first checkpoint."""
    real_save = checkpoint.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_train(argv, monkeypatch)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)


def read_log(out_dir):
    with open(Path(out_dir) / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def test_log_has_one_record_per_step_with_the_documented_keys(tmp_path, monkeypatch):
    write_shards(tmp_path / "data")
    run_train(tiny_flags(tmp_path), monkeypatch)
    log = read_log(tmp_path / "out")
    assert [r["step"] for r in log] == list(range(6))
    for key in ("step", "train_loss", "lr", "grad_norm", "dt_ms", "tok_per_s"):
        assert all(key in r for r in log)
    assert [r["step"] for r in log if "val_loss" in r] == [0, 3, 5]


def test_loss_falls_when_training_from_scratch(tmp_path, monkeypatch):
    write_shards(tmp_path / "data")
    run_train(tiny_flags(tmp_path, max_steps=30, eval_interval=0), monkeypatch)
    losses = [r["train_loss"] for r in read_log(tmp_path / "out")]
    assert losses[0] == pytest.approx(np.log(VOCAB), abs=0.3)  # a fresh model is ~uniform over the vocab
    assert np.mean(losses[-5:]) < losses[0] - 1.0


def test_lr_schedule_is_linear_warmup_then_cosine_to_min_lr(tmp_path, monkeypatch):
    write_shards(tmp_path / "data")
    run_train(tiny_flags(tmp_path, max_steps=12, warmup_steps=4, max_lr=1e-2, min_lr=1e-3), monkeypatch)
    lrs = [r["lr"] for r in read_log(tmp_path / "out")]
    expected = [1e-2 * (s + 1) / 4 for s in range(4)]
    expected += [1e-3 + 0.5 * (1 + np.cos(np.pi * (s - 4) / 8)) * 9e-3 for s in range(4, 12)]
    assert lrs == pytest.approx(expected)


def test_batch_that_does_not_divide_is_a_clear_error(tmp_path, monkeypatch):
    write_shards(tmp_path / "data")
    with pytest.raises(ValueError, match=r"total_batch_size=100 must be divisible by .* = 64"):
        run_train(tiny_flags(tmp_path, total_batch_size=100), monkeypatch)


def test_bf16_on_cpu_is_refused(tmp_path, monkeypatch):
    write_shards(tmp_path / "data")
    with pytest.raises(ValueError, match="dtype='bfloat16' on cpu"):
        run_train(tiny_flags(tmp_path, dtype="bfloat16"), monkeypatch)


@pytest.mark.parametrize("method, old_spelling", [
    ({"peft_method": "full"}, {"peft_method": "lora", "lora_r": 0}),  # full fine-tuning, before 'full' existed
    ({"peft_method": "lora", "lora_r": 4, "lora_targets": "re:.*c_attn"}, {"lora_targets": ".*c_attn"}),  # a bare regex
], ids=["full-as-lora_r=0", "lora-bare-regex-targets"])
def test_a_checkpoint_with_the_older_spelling_of_its_settings_resumes_as_the_same_run(tmp_path, monkeypatch, method,
                                                                                       old_spelling):
    write_shards(tmp_path / "data")
    init = {} if method["peft_method"] == "full" else {"init_from": str(tmp_path / "base")}
    if init:
        run_train(tiny_flags(tmp_path, out_dir=tmp_path / "base", max_steps=1), monkeypatch)
    run_train(tiny_flags(tmp_path, out_dir=tmp_path / "whole", **init, **method), monkeypatch)
    run_until_the_first_checkpoint(tiny_flags(tmp_path, out_dir=tmp_path / "split", checkpoint_interval=3, **init,
                                              **method), monkeypatch)
    path = tmp_path / "split" / "ckpt.pt"
    saved = torch.load(path, weights_only=True)
    saved["config"].update(old_spelling)  # as an older train.py wrote it
    torch.save(saved, path)
    run_train(tiny_flags(tmp_path, out_dir=tmp_path / "split", init_from="resume"), monkeypatch)
    whole, split = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert [r["train_loss"] for r in split] == [r["train_loss"] for r in whole]


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, monkeypatch):
    write_shards(tmp_path / "data")
    # dropout on: resuming must also restore the RNG, not only weights, optimizer and data position
    run_train(tiny_flags(tmp_path, out_dir=tmp_path / "whole", dropout=0.1), monkeypatch)

    real_save = checkpoint.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # the job is killed right after its step-3 checkpoint

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_train(tiny_flags(tmp_path, out_dir=tmp_path / "split", dropout=0.1, checkpoint_interval=3), monkeypatch)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert checkpoint.read_checkpoint(tmp_path / "split")["step"] == 3
    run_train(tiny_flags(tmp_path, out_dir=tmp_path / "split", dropout=0.1, init_from="resume"), monkeypatch)

    whole, split = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(6))
    assert [r["train_loss"] for r in split] == [r["train_loss"] for r in whole]  # bit for bit
    assert [r.get("val_loss") for r in split] == [r.get("val_loss") for r in whole]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from model import GPT
    write_shards(tmp_path / "data")
    real_forward, calls = GPT.forward, {"n": 0}

    def forward_that_diverges(self, idx, targets=None, kv_cache=None):
        logits, loss = real_forward(self, idx, targets, kv_cache)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 2 * 4:  # from step 4 on (2 micro-steps per step)
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward_that_diverges)
    with pytest.raises(SystemExit) as exit_info:
        run_train(tiny_flags(tmp_path, checkpoint_interval=2, eval_interval=0), monkeypatch)
    assert exit_info.value.code == 1
    assert "step 4: the loss is nan" in capsys.readouterr().out
    saved = checkpoint.read_checkpoint(tmp_path / "out")
    assert saved["step"] == 4
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def run_torchrun(argv, script="train.py"):
    """`torchrun --standalone --nproc_per_node=2 SCRIPT ARGV` (gloo on CPU, one thread per process)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *argv]
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize("extra", [{}, {"peft_method": "lora", "lora_r": 4, "lora_targets": ("c_attn", "c_fc")}], ids=["full", "lora"])
def test_two_process_ddp_matches_one_process_with_twice_the_accumulation(tmp_path, monkeypatch, extra):
    write_shards(tmp_path / "data")
    # one process: 4 micro-steps of 4 x 16 tokens per step
    run_train(tiny_flags(tmp_path, out_dir=tmp_path / "single", total_batch_size=4 * 16 * 4,
                         max_steps=4, eval_interval=2, **extra), monkeypatch)
    # two processes (gloo on CPU): 2 micro-steps each, the same 4 x 16 x 4 tokens per step
    result = run_torchrun(tiny_flags(tmp_path, out_dir=tmp_path / "ddp", total_batch_size=4 * 16 * 4,
                                               max_steps=4, eval_interval=2, **extra))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    single, ddp = read_log(tmp_path / "single"), read_log(tmp_path / "ddp")
    assert [r["train_loss"] for r in ddp] == pytest.approx([r["train_loss"] for r in single], rel=1e-5)
    assert [r["grad_norm"] for r in ddp] == pytest.approx([r["grad_norm"] for r in single], rel=1e-4)


CRASH_AFTER_FIRST_CHECKPOINT = """
import runpy, sys
sys.path.insert(0, {root!r})
import training.checkpoint as checkpoint
real_save = checkpoint.save_checkpoint
def save_then_crash(*args, **kwargs):
    real_save(*args, **kwargs)
    raise SystemExit("killed right after the first checkpoint")
checkpoint.save_checkpoint = save_then_crash
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow  # starts processes
def test_two_process_ddp_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    write_shards(tmp_path / "data")
    # dropout on: each rank draws its own masks, so each rank's RNG must come back, not only rank 0's
    flags = dict(dropout=0.1, total_batch_size=4 * 16 * 4, eval_interval=0)
    whole = run_torchrun(tiny_flags(tmp_path, out_dir=tmp_path / "whole", **flags))
    assert whole.returncode == 0, whole.stderr[-4000:]

    crash_script = tmp_path / "crash_after_first_checkpoint.py"
    crash_script.write_text(CRASH_AFTER_FIRST_CHECKPOINT.format(root=str(ROOT)))
    crashed = run_torchrun(tiny_flags(tmp_path, out_dir=tmp_path / "split", checkpoint_interval=3,
                                                **flags), script=crash_script)
    assert crashed.returncode != 0 and "killed right after the first checkpoint" in crashed.stderr, \
        crashed.stderr[-4000:]
    saved = checkpoint.read_checkpoint(tmp_path / "split")
    assert saved["step"] == 3 and len(saved["rng"]) == 2
    resumed = run_torchrun(tiny_flags(tmp_path, out_dir=tmp_path / "split", init_from="resume", **flags))
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    whole_log, split_log = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert [r["step"] for r in split_log] == list(range(6))
    assert [r["train_loss"] for r in split_log] == [r["train_loss"] for r in whole_log], \
        resumed.stdout[-2000:]  # bit for bit


@pytest.mark.slow  # starts processes
def test_resuming_with_another_number_of_processes_continues_and_says_dropout_will_differ(tmp_path, monkeypatch):
    write_shards(tmp_path / "data")
    flags = dict(dropout=0.1, total_batch_size=4 * 16 * 4, eval_interval=0)
    run_train(tiny_flags(tmp_path, max_steps=3, **flags), monkeypatch)  # one process, checkpoint at step 3
    resumed = run_torchrun(tiny_flags(tmp_path, max_steps=6, init_from="resume", **flags))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "RNG states for 1 process(es) and this run has 2" in resumed.stdout
    assert [r["step"] for r in read_log(tmp_path / "out")] == list(range(6))


def test_hellaswag_runs_in_training_and_logs_the_score_of_the_model_at_that_step(tmp_path, monkeypatch):
    import evals.hellaswag as eval_hellaswag
    from model import GPT, GPTConfig
    from test_hellaswag import EXAMPLES, write_jsonl
    write_shards(tmp_path / "data")
    jsonl = write_jsonl(tmp_path / "hellaswag_val.jsonl", EXAMPLES)
    monkeypatch.setattr(eval_hellaswag, "download", lambda split, data_dir, **kw: jsonl)  # no network
    flags = dict(vocab_size=50304, block_size=64, total_batch_size=4 * 64 * 2, max_steps=4, hellaswag_every=3)
    run_train(tiny_flags(tmp_path, **flags), monkeypatch)
    log = read_log(tmp_path / "out")
    assert [r["step"] for r in log if "hellaswag_acc_norm" in r] == [0, 3]
    # step 0 scores the freshly initialised model: rebuild it from the same seed and score it directly
    torch.manual_seed(1337)
    fresh = GPT(GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=32))
    expected = eval_hellaswag.evaluate(fresh, eval_hellaswag.load_examples(jsonl), "cpu")["acc_norm"]
    assert log[0]["hellaswag_acc_norm"] == expected


def dropout_probabilities(model):
    """Every dropout probability in the model: nn.Dropout modules and the attention's own (a float attribute)."""
    return ({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
            | {m.dropout for m in model.modules() if isinstance(getattr(m, "dropout", None), float)})


def test_dropout_applies_to_a_llama_from_scratch_a_loaded_out_dir_and_a_resumed_run(tmp_path, monkeypatch):
    write_shards(tmp_path / "data")
    flags = dict(model_type="llama", max_steps=2, eval_interval=0)
    run = run_train(tiny_flags(tmp_path, dropout=0.1, **flags), monkeypatch)
    assert dropout_probabilities(run["raw_model"]) == {0.1}
    run = run_train(tiny_flags(tmp_path, dropout=0.2, init_from=tmp_path / "out", out_dir=tmp_path / "ft", **flags),
                    monkeypatch)
    assert dropout_probabilities(run["raw_model"]) == {0.2}
    run = run_train(tiny_flags(tmp_path, dropout=0.3, init_from="resume", out_dir=tmp_path / "ft",
                               **{**flags, "max_steps": 3}), monkeypatch)
    assert dropout_probabilities(run["raw_model"]) == {0.3}
