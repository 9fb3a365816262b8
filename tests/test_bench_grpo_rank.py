"""bench/grpo_rank.py end to end in its smoke configuration (a tiny random base): a row per method, files written."""
import json

import pytest

from bench import grpo_rank


@pytest.mark.slow  # three train.py processes
def test_smoke_run_has_a_row_per_method_and_writes_json_markdown_and_png(tmp_path):
    rows, (json_path, md_path), png = grpo_rank.main(["--smoke", "--out_dir", str(tmp_path), "--threads", "1"])
    assert [r["row"] for r in rows] == list(grpo_rank.ROWS)
    assert rows[0]["params"] < rows[1]["params"] < rows[2]["params"]  # r=1 < r=16 < every weight
    runs = json.loads(open(json_path).read())["runs"]
    assert all(len(run["log"]) == 3 and "eval_reward" in run["log"][-1] for run in runs)  # --smoke: 3 steps
    assert "accuracy after" in open(md_path).read()
    assert png is None or png.endswith(".png")
