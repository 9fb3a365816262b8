"""train.py's wandb logging, run offline (WANDB_MODE=offline: no account, no network) and read back from disk."""
import json
import sys
from pathlib import Path

import pytest

from test_train import read_log, run_train, tiny_flags, write_shards


def read_offline_run(run_dir):
    """The protobuf records of an offline run's .wandb file: wandb's header (":W&B", magic, version: 7 bytes), then
    LevelDB's log format: 32 KiB blocks of records (crc 4, length 2, type 1; full = 1, first/middle/last = 2/3/4),
    a record never starting in the last 6 bytes of a block."""
    from wandb.proto import wandb_internal_pb2
    data = next(Path(run_dir).glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # zero padding to the end of the block
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_offline_wandb_run_holds_the_config_and_every_logged_key_per_step(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    write_shards(tmp_path / "data")
    run_train(tiny_flags(tmp_path, max_steps=3, eval_interval=2, wandb_log=True, wandb_project="p",
                         wandb_run_name="tiny"), monkeypatch)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    records = read_offline_run(run_dir)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert (run.project, run.display_name) == ("p", "tiny")
    assert config["max_steps"] == 3 and config["n_embd"] == 32 and config["lora_targets"] == ["c_attn"]
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history[items["_step"]] = {k: v for k, v in items.items() if not k.startswith("_")}
    assert history == {rec["step"]: rec for rec in read_log(tmp_path / "out")}  # what log.jsonl has, step by step


def test_missing_wandb_is_a_one_line_error_naming_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    write_shards(tmp_path / "data")
    with pytest.raises(SystemExit, match=r"^wandb_log=True needs the wandb package: pip install wandb"):
        run_train(tiny_flags(tmp_path, wandb_log=True), monkeypatch)
