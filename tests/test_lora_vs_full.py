"""bench/lora_vs_full.py: the effective rank of an update of known rank, the choice of a family's learning rate, the
--smoke run end to end, and --resume skipping what the results hold."""
import copy
import json
import math
import os
from pathlib import Path

import pytest
import torch

from bench import lora_vs_full as bench
from bench import lora_vs_full_report as report
from bench import lora_vs_full_world as world
from model import LLaMA, LLaMAConfig
from tools.errors import UserError


def update_of(singular_values, shape=(12, 9), seed=0):
    """U diag(s) V^T with orthonormal U (out, k) and V (in, k): an update whose singular values are s."""
    g = torch.Generator().manual_seed(seed)
    k = len(singular_values)
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(shape[1], k, generator=g, dtype=torch.float64))[0]
    return u @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T


# --- effective rank ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s, rank90, entropy_rank", [
    ((4.0, 2.0, 1.0, 1.0), 2, 2 ** 1.75),  # energy 16, 4, 1, 1: 20/22 >= 0.9 at k=2; p = 1/2, 1/4, 1/8, 1/8
    ((1.0,) * 5, 5, 5.0),  # 4 of 5 equal directions hold 80%: all 5 are needed; k equal ones: entropy rank k
    ((3.0, 2.0, 1.0), 2, math.exp(-(0.5 * math.log(0.5) + math.log(1 / 3) / 3 + math.log(1 / 6) / 6))),
    ((7.0,), 1, 1.0),
])
def test_the_ranks_of_a_sum_of_outer_products_are_their_closed_forms(s, rank90, entropy_rank):
    measured = report.rank_measures(torch.linalg.svdvals(update_of(s)))
    assert measured[0] == rank90
    assert measured[1] == pytest.approx(entropy_rank, rel=1e-6)  # the svd's ~1e-16 others add nothing visible


def test_a_zero_update_has_rank_zero():
    assert report.rank_measures(torch.zeros(6)) == (0, 0.0)


def test_update_ranks_average_each_projection_over_the_blocks():
    torch.manual_seed(0)
    base = LLaMA(LLaMAConfig(vocab_size=64, n_embd=16, intermediate_size=32, n_layer=2, n_head=2, n_kv_head=2,
                             max_seq_len=16))
    tuned = copy.deepcopy(base)
    with torch.no_grad():  # q_proj moves by rank 3 (s = 3, 2, 1) in block 0 and by rank 1 in block 1; nothing else
        tuned.model.layers[0].self_attn.q_proj.weight += update_of((3.0, 2.0, 1.0), (16, 16)).float()
        tuned.model.layers[1].self_attn.q_proj.weight += update_of((5.0,), (16, 16), seed=1).float()
    rows = {r["projection"]: r for r in report.update_ranks(base, tuned)}
    assert set(rows) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}  # lm_head is not in a block
    q = rows["self_attn.q_proj"]
    three = math.exp(-(0.5 * math.log(0.5) + math.log(1 / 3) / 3 + math.log(1 / 6) / 6))
    assert (q["blocks"], q["max_rank"], q["shape"]) == (2, 16, "16x16")
    assert q["rank90"] == 1.5 and q["entropy_rank"] == pytest.approx((three + 1) / 2, rel=1e-3)  # float32 weights
    assert rows["mlp.down_proj"]["rank90"] == 0 and rows["mlp.down_proj"]["shape"] == "16x32"


# --- choosing a family's learning rate ---------------------------------------------------------------------------
def sweep(*runs):
    return [dict(lr=lr, after=after, best_val=val) for lr, after, val in runs]


def test_the_best_rate_has_the_highest_accuracy_then_the_lowest_val_loss_and_a_diverged_run_never_wins():
    assert report.best_rate(sweep((1e-5, 0.2, 2.0), (3e-5, 0.4, 1.9), (1e-4, 0.4, 1.8), (3e-4, None, None))) == 1e-4
    assert report.best_rate(sweep((1e-3, 0.5, 3.0), (3e-3, 0.4, 1.0))) == 1e-3  # accuracy first, loss only on a tie
    assert report.best_rate(sweep((1e-3, None, None))) is None


def test_every_row_of_a_family_runs_at_its_best_rate_and_the_others_at_their_own():
    state = dict(rates={"speakers": {"full": 3e-5, "lora": 1e-3}})
    rates = {row: bench.rate(None, state, "speakers", row) for row in bench.ROWS}
    assert rates["full"] == 3e-5
    assert all(rates[row] == 1e-3 for row in bench.ROWS if bench.ROWS[row][0] == "lora")
    assert (rates["prompt"], rates["prefix"]) == (bench.FIXED_RATES["prompt"], bench.FIXED_RATES["prefix"])


# --- runs and the bench ---------------------------------------------------------------------------------------------
def test_a_run_stopped_by_a_non_finite_loss_is_recorded_as_diverged_and_any_other_failure_ends_the_bench(
        tmp_path, monkeypatch):
    cfg = bench.configure(bench.parse(["--smoke", "--out_dir", str(tmp_path), "--threads", "1"]))
    cfg.update(work=str(tmp_path), data={task: str(tmp_path / task) for task in bench.TASKS})
    stopped = ("step 2: the loss is nan and the gradient norm nan: stopping without applying this update. no "
               "checkpoint was written to out")
    monkeypatch.setattr(bench, "launch", lambda cfg, argv: (1, stopped))
    record = bench.run(cfg, "speakers", "full", 1.0, 1, True, base=None, tok=None)
    assert (record["after"], record["forgetting"], record["questions"]) == (None, None, None)
    assert report.task_rows([record], "speakers", ["full"], lambda task, row: 1.0)[0]["after"] == "diverged"
    assert report.best_rate([record, dict(record, lr=0.1, after=0.0, best_val=9.0)]) == 0.1
    monkeypatch.setattr(bench, "launch", lambda cfg, argv: (1, "error: data_dir=x: no such folder"))
    with pytest.raises(SystemExit, match=r"speakers / full / lr 1 / seed 1 failed \(exit 1\):\nerror: .* no such"):
        bench.run(cfg, "speakers", "full", 1.0, 1, True, base=None, tok=None)


@pytest.mark.slow  # 34 train.py runs on a tiny model, in this process (~40 s on 2 cores)
def test_the_smoke_run_writes_every_row_of_both_tasks_the_sweep_and_the_ranks(tmp_path):
    tables, (json_path, md_path), pngs = bench.main(["--smoke", "--out_dir", str(tmp_path), "--threads", "1"])
    assert list(tables) == list(bench.TASKS)
    for rows in tables.values():
        assert [r["row"] for r in rows] == list(bench.ROWS)
        by_name = {r["row"]: r for r in rows}
        assert by_name["full"]["seeds"] == "1,2" and by_name["lora r=16"]["seeds"] == "1,2"  # mean ± std
        assert "±" in by_name["full"]["after"] and by_name["prompt"]["seeds"] == "1"
        assert by_name["lora r=1"]["params"] < by_name["lora r=4"]["params"] < by_name["lora r=16"]["params"] < \
            by_name["lora r=64"]["params"] < by_name["full"]["params"]
        assert by_name["lora r=16 attention"]["params"] < by_name["lora r=16"]["params"]
    results = json.loads(Path(json_path).read_text())
    for task in bench.TASKS:
        swept = [r for r in results["runs"] if r["task"] == task and r["sweep"]]
        assert sorted((r["row"], r["lr"]) for r in swept) == sorted(
            (bench.SWEPT[f], lr) for f in bench.SWEPT for lr in bench.MODES["smoke"]["grids"][f])
        assert set(results["rates"][task]) == {"full", "lora"}
        assert len(results["ranks"][task]["rows"]) == 7  # the seven projections
    assert all(len(r["accuracy"]) == len(r["acc_steps"]) == 2 and r["forgetting"] is not None for r in results["runs"])
    md = Path(md_path).read_text()
    for header, _, _ in report.TASK_COLUMNS + report.SWEEP_COLUMNS + report.RANK_COLUMNS:
        assert f"| {header} |" in md or f"| {header}" in md, header
    assert pngs is None or all(p.endswith(".png") for p in pngs)


def test_resume_skips_the_runs_the_results_hold_and_refuses_results_of_other_settings(tmp_path, monkeypatch):
    args = ["--smoke", "--out_dir", str(tmp_path / "results"), "--work", str(tmp_path / "work"), "--threads", "1",
            "--tasks", "speakers", "--seeds", "1"]
    tables, _, _ = bench.main(args + ["--rows", "lora r=16"])  # its sweep only: its last run chooses the rate
    assert [r["row"] for r in tables["speakers"]] == ["lora r=16"]  # the row at that rate
    assert tables["speakers"][0]["lr"] in bench.MODES["smoke"]["grids"]["lora"]
    launched = []
    real_launch = bench.launch

    def counting_launch(cfg, argv):
        launched.append(next(a for a in argv if a.startswith("--peft_method=")))
        return real_launch(cfg, argv)

    monkeypatch.setattr(bench, "launch", counting_launch)
    tables, (json_path, _), _ = bench.main(args + ["--rows", "lora r=16,prompt", "--resume"])
    assert launched == ["--peft_method=prompt"]  # the sweep's runs are in the results already
    assert [r["row"] for r in tables["speakers"]] == ["lora r=16", "prompt"]
    assert len(json.loads(Path(json_path).read_text())["runs"]) == 3
    bench.main(args + ["--rows", "lora r=16,prompt", "--resume"])
    assert launched == ["--peft_method=prompt"]  # nothing left to run
    with pytest.raises(UserError, match="--resume: .* other settings"):
        bench.main(args + ["--rows", "prompt", "--resume", "--steps", "4"])


def test_costs_measured_twice_still_name_the_commit_of_the_runs_and_a_new_run_drops_the_costs_note(tmp_path,
                                                                                                   monkeypatch):
    from bench import common
    args = ["--smoke", "--out_dir", str(tmp_path / "results"), "--work", str(tmp_path / "work"), "--threads", "1",
            "--tasks", "speakers", "--seeds", "1", "--rows", "prompt"]

    def at_commit(commit):
        monkeypatch.setattr(common, "git_commit", lambda: commit)  # what the results file's env records
        monkeypatch.setattr(bench, "git_commit", lambda: commit)

    at_commit("runs")
    _, (json_path, _), _ = bench.main(args)
    for commit in ("costs-1", "costs-2"):
        at_commit(commit)
        bench.main(args + ["--costs"])
    assert json.loads(Path(json_path).read_text())["costs"] == {"commit": "costs-2", "runs_commit": "runs"}
    _, (json_path, md_path), _ = bench.main(args + ["--rows", "prompt,prefix", "--resume"])  # one run more
    assert json.loads(Path(json_path).read_text())["costs"] is None
    assert "measured again by --costs" not in Path(md_path).read_text()


def test_results_name_a_model_inside_the_checkout_relative_to_it_so_a_moved_checkout_resumes_them(tmp_path,
                                                                                                    monkeypatch):
    settings = []
    for checkout in (tmp_path / "here", tmp_path / "moved"):
        monkeypatch.setattr(world, "ROOT", str(checkout))
        cfg = dict.fromkeys(bench.SETTINGS, 1)
        cfg["model"] = str(checkout / "models" / "smollm2")
        settings.append(bench.settings_of(cfg))
    assert settings[0] == settings[1] and settings[0]["model"] == os.path.join("models", "smollm2")
    cfg["model"] = str(tmp_path / "elsewhere" / "smollm2")  # outside the checkout: the absolute path
    assert bench.settings_of(cfg)["model"] == cfg["model"]


def test_adalora_prunes_inside_the_run_it_is_given_the_short_runs_of_costs_too():
    from lora.adalora import AdaLoRAConfig
    cfg = dict(bench.MODES["full"], task_table=bench.TASKS, model="base", data=dict.fromkeys(bench.TASKS, "data"))
    for over in ({}, {"max_steps": bench.COST_STEPS}):
        flags = dict(a[2:].split("=", 1) for a in bench.train_flags(cfg, "speakers", "adalora 12->8", 1e-3, 1, "out",
                                                                      **over))
        # train.py builds this config; it refuses a schedule that leaves no pruning phase
        AdaLoRAConfig(total_step=int(flags["max_steps"]), tinit=int(flags["adalora_tinit"]),
                      tfinal=int(flags["adalora_tfinal"]))


def test_costs_measures_each_row_once_in_a_short_run_and_writes_the_results_again(tmp_path, monkeypatch):
    args = ["--smoke", "--out_dir", str(tmp_path / "results"), "--work", str(tmp_path / "work"), "--threads", "1",
            "--tasks", "speakers", "--seeds", "1", "--rows", "lora r=16,prompt"]
    with pytest.raises(UserError, match="--costs: no results"):
        bench.main(args + ["--costs"])
    _, (json_path, _), _ = bench.main(args)
    results_before = json.loads(Path(json_path).read_text())["runs"]
    launched = []
    real_launch = bench.launch

    def counting_launch(cfg, argv):
        launched.append([a for a in argv if a.split("=")[0] in ("--peft_method", "--max_steps",
                                                                "--eval_generate_every")])
        return real_launch(cfg, argv)

    monkeypatch.setattr(bench, "launch", counting_launch)
    tables, (json_path, md_path), _ = bench.main(args + ["--costs"])
    steps = f"--max_steps={bench.COST_STEPS}"
    assert launched == [[steps, "--eval_generate_every=0", "--peft_method=lora"],
                        [steps, "--eval_generate_every=0", "--peft_method=prompt"]]
    results = json.loads(Path(json_path).read_text())
    assert len(results["runs"]) == len(bench.MODES["smoke"]["grids"]["lora"]) + 1  # the sweep's, prompt's: no more
    before = {r["row"]: r["step_s"] for r in results_before}
    assert all(r["peak_gb"] is not None and r["step_s"] > 0 for r in results["runs"])
    assert {r["row"]: r["step_s"] for r in results["runs"]} != before  # measured again
    assert results["costs"]["commit"] == results["env"]["commit"]
    assert "measured again by --costs" in Path(md_path).read_text()
    assert [r["row"] for r in tables["speakers"]] == ["lora r=16", "prompt"]
    with pytest.raises(UserError, match="--costs: .* other settings"):  # costs of other runs would be wrong
        bench.main(args + ["--costs", "--steps", "4"])
