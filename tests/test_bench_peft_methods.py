"""bench/peft_methods.py end to end in its smoke configuration: every method a row, every column filled, files
written. No time is asserted."""
import json
import os

from bench import peft_methods


def test_smoke_run_has_a_row_per_method_with_every_column(tmp_path):
    rows, (json_path, md_path), png = peft_methods.main(["--smoke", "--out_dir", str(tmp_path), "--threads", "1"])
    assert [r["method"] for r in rows] == list(peft_methods.ROWS)
    for row in rows:
        assert set(key for _, key, _ in peft_methods.COLUMNS) <= set(row)
    trainable = {r["method"]: r["trainable"] for r in rows}
    assert trainable["lora r=1"] < trainable["lora r=4"] < trainable["lora r=16"] < trainable["lora r=64"]
    table = open(md_path).read()
    assert table.count("\n| ") == len(peft_methods.ROWS) + 1  # header + one line per method
    runs = json.load(open(json_path))["runs"]
    assert all(len(run["curve"]["train"]) == 6 for run in runs)  # --smoke: 6 steps
    assert png is None or os.path.getsize(png) > 0
