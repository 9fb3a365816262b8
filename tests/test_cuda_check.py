"""bench/cuda_check.py without a GPU: the one line and exit 0, and its checks on the CPU in fp32 at tiny sizes (the
same code paths, where they exist on a CPU: torch.compile with the aot_eager backend, FSDP2 on gloo, a disabled
GradScaler), rows of the right form, a broken check reported as failed without stopping the others."""
import json
import subprocess
import sys

import pytest
import torch

from bench import cuda_check as cc
from bench import cuda_paths as paths
from conftest import subprocess_env
from test_bench import ROOT

CPU = dict(device="cpu", amp=torch.float32, half=torch.float32, backend=None, size=paths.TINY)  # backend None: eager
FAST = ("lora_bf16", "dora_bf16", "fused_adamw", "sdpa_packed", "fp16", "mfu")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def broken(ctx, m):
    m["measured before failing"] = 1.5
    raise AssertionError("deliberately broken")


def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = subprocess.run([sys.executable, "-m", "bench.cuda_check"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=subprocess_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1 and "no CUDA device here" in out.stdout


def test_checks_run_on_the_cpu_and_a_broken_one_is_a_failed_row_that_stops_nothing():
    checks = {name: paths.CHECKS[name] for name in FAST[:3]}
    checks["broken"] = broken
    checks.update({name: paths.CHECKS[name] for name in FAST[3:]})
    rows = cc.run_checks(checks, CPU)
    assert [r["check"] for r in rows] == list(checks)
    for row in rows:
        assert set(row) == {"check", "status", "measured", "seconds", "error"} and row["seconds"] >= 0
        assert row["status"] == ("failed" if row["check"] == "broken" else "passed"), row
    failed = rows[list(checks).index("broken")]
    assert failed["error"].startswith("AssertionError: deliberately broken (at test_cuda_check.py:")
    assert failed["measured"] == {"measured before failing": 1.5}  # what it measured before failing is kept
    by_name = {r["check"]: r["measured"] for r in rows}
    assert by_name["lora_bf16"]["fused dA"] < 1e-5 and by_name["dora_bf16"]["fused dm"] < 1e-5
    assert by_name["fused_adamw"]["fused"] is True  # configure_adamw's choice on the CPU too
    assert "_scaled_dot_product" in by_name["sdpa_packed"]["packed kernel"]
    assert by_name["fp16"]["mean of last 5"] < by_name["fp16"]["first loss"]
    assert by_name["mfu"]["MFU"] == "-" and by_name["mfu"]["tok/s"] > 0  # no bf16 peak for a CPU
    table = cc.table(rows)
    assert table.count("\n") == len(rows) + 1 and "| broken | failed | measured before failing 1.5 |" in table


def test_a_wrong_number_fails_the_check(monkeypatch):
    monkeypatch.setitem(paths.TOL, torch.float32, 1e-12)  # fp32 against float64 cannot be this close
    rows = cc.run_checks({"lora_bf16": paths.CHECKS["lora_bf16"]}, CPU)
    assert rows[0]["status"] == "failed" and "relative error" in rows[0]["error"]
    assert rows[0]["measured"]["split y"] > 1e-12


def test_main_writes_the_rows_with_the_commit_and_exits_1_when_a_check_failed(tmp_path, monkeypatch):
    from bench import common
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cc, "cuda_context", lambda device: CPU)
    monkeypatch.setattr(cc, "cuda_environment", lambda device: common.environment("cpu", 1))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a CPU standing in for a GPU")
    monkeypatch.setitem(paths.CHECKS, "broken", broken)
    assert cc.main(["--checks", "dora_bf16,broken", "--out_dir", str(tmp_path)]) == 1
    saved = json.loads((tmp_path / "cpu_cuda_check.json").read_text())
    assert [(r["check"], r["status"]) for r in saved["rows"]] == [("dora_bf16", "passed"), ("broken", "failed")]
    md = (tmp_path / "cpu_cuda_check.md").read_text()
    assert "1 of 2 checks passed; failed: broken" in md and f"- commit: {common.git_commit()}" in md
    assert cc.main(["--checks", "dora_bf16", "--out_dir", str(tmp_path)]) == 0
    with pytest.raises(SystemExit, match="choose from"):
        cc.main(["--checks", "nonsense"])


@pytest.mark.slow  # traces the model (aot_eager) and starts a gloo process group
@pytest.mark.parametrize("name", ["compile", "fsdp"])
def test_compile_and_fsdp_checks_pass_on_the_cpu(name):
    rows = cc.run_checks({name: paths.CHECKS[name]}, dict(CPU, backend="aot_eager"))
    assert rows[0]["status"] == "passed", rows[0]["error"]
    key = "max rel diff" if name == "compile" else "loss rel diff"
    assert rows[0]["measured"][key] < 1e-5
