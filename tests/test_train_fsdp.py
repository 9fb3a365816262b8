"""train.py with --parallel=fsdp: 2 gloo processes on the CPU against one process with twice the accumulation.

Both see the same tokens per optimizer step, so their losses agree up to the order of floating-point sums. Every
launch starts 2 processes (slow on 2 cores), so each test checks all it can of one set of runs."""
import json
import shutil

import pytest
from safetensors.torch import load_file
from torch.testing import assert_close

import training.checkpoint as checkpoint
from test_train import CRASH_AFTER_FIRST_CHECKPOINT, ROOT, read_log, run_torchrun, run_train, tiny_flags, write_shards

pytestmark = pytest.mark.slow

STEP = dict(total_batch_size=4 * 16 * 4, eval_interval=0)  # one process: 4 micro-steps; two: 2 each


def losses(out_dir):
    return [r["train_loss"] for r in read_log(out_dir)]


def crash_after_first_checkpoint(tmp_path, argv):
    script = tmp_path / "crash_after_first_checkpoint.py"
    script.write_text(CRASH_AFTER_FIRST_CHECKPOINT.format(root=str(ROOT)))
    crashed = run_torchrun(argv, script=script)
    assert crashed.returncode != 0 and "killed right after the first checkpoint" in crashed.stderr, \
        crashed.stderr[-4000:]


def test_fsdp_matches_one_process_and_resumes_after_a_kill_with_the_losses_of_an_uninterrupted_run(tmp_path,
                                                                                                   monkeypatch):
    write_shards(tmp_path / "data")
    run_train(tiny_flags(tmp_path, out_dir=tmp_path / "single", **STEP), monkeypatch)
    fsdp = dict(parallel="fsdp", **STEP)
    whole = run_torchrun(tiny_flags(tmp_path, out_dir=tmp_path / "whole", **fsdp))
    assert whole.returncode == 0, whole.stdout[-2000:] + whole.stderr[-4000:]
    assert losses(tmp_path / "whole") == pytest.approx(losses(tmp_path / "single"), rel=2e-4)

    crash_after_first_checkpoint(tmp_path, tiny_flags(tmp_path, out_dir=tmp_path / "split", checkpoint_interval=3,
                                                      **fsdp))
    assert checkpoint.read_checkpoint(tmp_path / "split")["step"] == 3
    shutil.copytree(tmp_path / "split", tmp_path / "split_one_process")
    resumed = run_torchrun(tiny_flags(tmp_path, out_dir=tmp_path / "split", init_from="resume", **fsdp))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")  # bit for bit

    # the same checkpoint is an ordinary one: a single process resumes it (ddp reads the same file)
    run_train(tiny_flags(tmp_path, out_dir=tmp_path / "split_one_process", init_from="resume", **STEP), monkeypatch)
    assert losses(tmp_path / "split_one_process") == pytest.approx(losses(tmp_path / "whole"), rel=2e-4)


def test_fsdp_lora_llama_matches_one_process_and_writes_the_same_adapter_and_merged_model(tmp_path, monkeypatch):
    write_shards(tmp_path / "data")
    lora = dict(model_type="llama", peft_method="lora", lora_r=4, lora_targets=("q_proj", "v_proj", "down_proj"), merge_on_save=True,
                **{**STEP, "eval_interval": 3})  # val loss at steps 0, 3, 5: every rank runs the eval forwards
    # val loss: each of 2 ranks reads every other batch, so 2 batches a rank are the single process's first 4
    run_train(tiny_flags(tmp_path, out_dir=tmp_path / "single", eval_iters=4, **lora), monkeypatch)
    result = run_torchrun(tiny_flags(tmp_path, out_dir=tmp_path / "fsdp", eval_iters=2, parallel="fsdp", **lora))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "single"), rel=2e-4)
    val = [[r["val_loss"] for r in read_log(tmp_path / run) if "val_loss" in r] for run in ("fsdp", "single")]
    assert len(val[0]) == 3 and val[0] == pytest.approx(val[1], rel=2e-4)

    for folder, weights in (("adapter", "adapter_model.safetensors"), ("merged", "model.safetensors")):
        single, fsdp = load_file(tmp_path / "single" / folder / weights), load_file(tmp_path / "fsdp" / folder / weights)
        assert sorted(fsdp) == sorted(single), folder
        assert_close(fsdp, single, rtol=1e-4, atol=1e-6)
    config = "adapter/adapter_config.json"
    assert json.loads((tmp_path / "fsdp" / config).read_text()) == json.loads((tmp_path / "single" / config).read_text())
    saved = checkpoint.read_checkpoint(tmp_path / "fsdp")["model"]
    assert saved and all(".lora_" in k for k in saved)  # the checkpoint holds the adapter only, gathered whole


def test_a_ddp_checkpoint_resumes_under_fsdp(tmp_path, monkeypatch):
    write_shards(tmp_path / "data")
    flags = dict(model_type="llama", **STEP)
    run_train(tiny_flags(tmp_path, out_dir=tmp_path / "single", **flags), monkeypatch)
    crash_after_first_checkpoint(tmp_path, tiny_flags(tmp_path, out_dir=tmp_path / "split", checkpoint_interval=3,
                                                      parallel="ddp", **flags))
    resumed = run_torchrun(tiny_flags(tmp_path, out_dir=tmp_path / "split", init_from="resume", parallel="fsdp",
                                      **flags))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert [r["step"] for r in read_log(tmp_path / "split")] == list(range(6))
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "single"), rel=2e-4)
