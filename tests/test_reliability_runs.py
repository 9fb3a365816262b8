"""Runs and their folders: an out_dir that holds what a run loads is refused even with overwrite, overwrite deletes
nothing before the run can start, one run at a time per out_dir, and a full or read-only disk is one line that names
the file and says what to do."""
import errno
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import training.checkpoint as checkpoint
from conftest import subprocess_env
from model import GPT, GPTConfig
from test_safety import finished_run, flags, run_copy, snapshot  # noqa: F401 (fixtures)
from test_train import ROOT, run_train
from tools.atomic import atomic_path
from tools.errors import is_user_error, one_line
import training.run_dir as run_dir



# --- what a run loads is never deleted ----------------------------------------------------------------------------
@pytest.fixture
def lora_run(run_copy, monkeypatch):  # noqa: F811
    """run_copy with lora/: a LoRA run on out/ (its base), with its adapter folder lora/adapter."""
    run_train(flags(run_copy, max_steps=1, init_from=run_copy / "out", out_dir=run_copy / "lora", peft_method="lora",
                    lora_r=2), monkeypatch)
    return run_copy


@pytest.mark.parametrize("load", ["lora", "lora/adapter"])
def test_overwrite_into_the_out_dir_holding_the_base_of_what_the_run_loads_is_refused_and_deletes_nothing(
        lora_run, monkeypatch, load):
    before = snapshot(lora_run / "out")
    with pytest.raises(ValueError, match=r"holds .*out/?, the base of .*even with overwrite=True"):
        run_train(flags(lora_run, init_from=lora_run / load, out_dir=lora_run / "out", overwrite=True), monkeypatch)
    assert snapshot(lora_run / "out") == before


def test_claim_finds_the_base_behind_an_adapter_and_a_lora_out_dir_and_refuses_it(lora_run):
    for init_from in (lora_run / "lora", lora_run / "lora" / "adapter", lora_run / "lora" / "ckpt.pt"):
        with pytest.raises(ValueError, match="the base of"):
            run_dir.claim_out_dir(lora_run / "out", str(init_from), overwrite=True, argv=[])
    run_dir.claim_out_dir(lora_run / "elsewhere", str(lora_run / "lora"), overwrite=True, argv=[])  # a new folder


def test_overwrite_with_clear_later_deletes_the_previous_run_only_when_told(run_copy):  # noqa: F811
    before = snapshot(run_copy / "out")
    claim = run_dir.claim_out_dir(run_copy / "out", "scratch", overwrite=True, argv=[], clear_later=True)
    assert snapshot(run_copy / "out") == before  # the run has not started yet: everything is still there
    claim.clear()
    assert not (run_copy / "out" / "ckpt.pt").exists() and not (run_copy / "out" / "log.jsonl").exists()


def test_an_overwrite_run_refused_after_its_model_loads_leaves_the_previous_run_whole(run_copy,  # noqa: F811
                                                                                      monkeypatch):
    tiny = GPT(GPTConfig(block_size=16, vocab_size=128, n_layer=1, n_head=2, n_embd=16))
    tiny.save_pretrained(run_copy / "hf")
    before = snapshot(run_copy / "out")
    with pytest.raises(ValueError, match=r"n_layer=3 \(the model has 1\)"):  # refused once the model has loaded
        run_train(flags(run_copy, init_from=run_copy / "hf", overwrite=True, n_layer=3), monkeypatch)
    assert snapshot(run_copy / "out") == before


# --- one run at a time ---------------------------------------------------------------------------------------------
HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from training.run_dir import claim_out_dir
claim_out_dir({out!r}, "scratch", False, argv=[], lock=True)
print("holding", flush=True)
time.sleep(60)
"""


def test_a_second_claim_of_an_out_dir_in_use_is_refused_by_name_until_the_first_process_dies(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), out=str(out))], env=subprocess_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(ValueError, match=f"out_dir '{out}' is in use by another train.py run"):
            run_dir.claim_out_dir(out, "scratch", False, argv=[], lock=True)
    finally:
        holder.kill()  # SIGKILL: no exit handler runs, the kernel drops the lock
        holder.wait()
        holder.stdout.close()
    claim = run_dir.claim_out_dir(out, "scratch", False, argv=[], lock=True)  # the lock died with its process
    claim.release()
    assert list(out.iterdir()) == []  # released: the lock file goes too


def test_the_lock_is_reentrant_in_one_process_and_released_by_release(tmp_path):
    run_dir.lock_out_dir(tmp_path / "out")
    run_dir.lock_out_dir(tmp_path / "out")  # train.py run twice in one process (the tests) holds it already
    assert (tmp_path / "out" / ".lock").exists()
    run_dir.release_out_dir(tmp_path / "out")
    assert not (tmp_path / "out" / ".lock").exists()


@pytest.mark.slow  # two processes
def test_two_train_runs_started_into_one_empty_out_dir_at_the_same_moment_one_is_refused(tmp_path):
    from test_train import write_shards
    write_shards(tmp_path / "data")
    argv = [sys.executable, "train.py", *flags(tmp_path, max_steps=20)]
    runs = [subprocess.Popen(argv, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    errors = [run.communicate(timeout=300)[1] for run in runs]
    assert sorted(run.returncode for run in runs) == [0, 1], errors
    refusal = errors[[run.returncode for run in runs].index(1)]
    assert refusal.startswith("error: ") and "is in use by another train.py run" in refusal
    assert refusal.count("\n") == 1


# --- full and read-only disks --------------------------------------------------------------------------------------
def tiny_save(folder):
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    checkpoint.save_checkpoint(folder, model, torch.optim.AdamW(model.parameters()), 1, {}, {})


def test_torch_save_on_a_full_disk_is_a_disk_full_error_naming_the_checkpoint(tmp_path, monkeypatch):
    def full_disk_save(obj, f, *args, **kwargs):  # what torch.save raises when the disk fills up mid-write
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=0))
    with pytest.raises(OSError) as failure:
        tiny_save(tmp_path)
    assert failure.value.errno == errno.ENOSPC and is_user_error(failure.value)
    assert "cannot write" in str(failure.value) and "ckpt.pt: disk full" in str(failure.value)
    assert "free some space" in one_line(failure.value)
    assert os.listdir(tmp_path) == []  # no temp file left to fill the disk further


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 256 KiB tmpfs (mount needs root; skipped where it cannot be mounted)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_checkpoint_on_a_really_full_disk_is_one_line_and_leaves_nothing(small_tmpfs):
    (small_tmpfs / "filler").write_bytes(b"\0" * (200 * 1024))
    with pytest.raises(OSError) as failure:
        model = GPT(GPTConfig(block_size=8, vocab_size=512, n_layer=1, n_head=1, n_embd=64))
        checkpoint.save_checkpoint(small_tmpfs, model, torch.optim.AdamW(model.parameters()), 1, {}, {})
    assert is_user_error(failure.value) and "disk full" in str(failure.value)
    assert sorted(os.listdir(small_tmpfs)) == ["filler"]


def test_a_token_shard_on_a_really_full_disk_is_one_line_and_leaves_nothing(small_tmpfs):
    import numpy as np
    from fineweb import save_shard
    with pytest.raises(OSError) as failure:  # numpy's own error: "OSError: ... requested and ... written", no errno
        save_shard(small_tmpfs / "t_train_000001.npy", np.zeros(200_000, dtype=np.uint16))
    assert is_user_error(failure.value) and "t_train_000001.npy: disk full" in str(failure.value)
    assert os.listdir(small_tmpfs) == []


def test_a_read_only_out_dir_is_one_line_naming_it_before_anything_loads(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, *args, **kwargs):  # a read-only mount (chmod does not stop root, who runs the tests)
        if str(path).startswith(str(tmp_path / "out")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(OSError) as failure:
        run_dir.claim_out_dir(tmp_path / "out", "scratch", False, argv=[], lock=True)
    assert is_user_error(failure.value) and f"out_dir '{tmp_path / 'out'}' is not writable" in str(failure.value)
    with pytest.raises(OSError, match=r"cannot write .*model\.bin: Read-only") as failure:
        with atomic_path(tmp_path / "out" / "model.bin") as tmp:
            Path(tmp).write_bytes(b"x")
    assert is_user_error(failure.value)


# --- data of another tokenizer -------------------------------------------------------------------------------------
def test_sft_data_of_another_tokenizer_is_refused_before_training(tmp_path, monkeypatch):
    import prepare_sft
    from test_prepare_sft import write_jsonl, write_llama3_folder
    chat = [{"role": "user", "content": "who wrote hamlet"}, {"role": "assistant", "content": "shakespeare"}]
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": chat}] * 4)
    prepare_sft.prepare(data, data, tmp_path / "sft", tokenizer=write_llama3_folder(tmp_path / "llama3"), block_size=32)
    GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="was tokenized with .*llama3, another tokenizer than the model's"):
        run_train(flags(tmp_path, objective="sft", data_dir=tmp_path / "sft", init_from=tmp_path / "gpt2",
                        block_size=32, total_batch_size=4 * 32 * 2, vocab_size=50304, n_layer=1, n_head=2, n_embd=16),
                  monkeypatch)
    assert not (tmp_path / "out" / "ckpt.pt").exists()
