"""What every bench/ results file records of its run (the git commit, the load), and the titles of its plots."""
import json
import subprocess

import pytest

from bench import common
from conftest import subprocess_env
from test_bench import TINY


def git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True, env=subprocess_env())


def test_the_commit_is_the_short_hash_and_dirty_only_for_changed_tracked_files_outside_results(tmp_path):
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "train.py").write_text("a\n")
    (tmp_path / "bench" / "results" / "cpu_x.md").write_text("old\n")
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "first")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert common.git_commit(tmp_path) == head
    (tmp_path / "bench" / "results" / "cpu_x.md").write_text("new results\n")  # a bench run's own output
    (tmp_path / "notes.txt").write_text("untracked\n")
    assert common.git_commit(tmp_path) == head
    (tmp_path / "train.py").write_text("b\n")
    assert common.git_commit(tmp_path) == head + "+dirty"
    assert common.git_commit(tmp_path / "nowhere") == "unknown"


def test_save_results_records_the_commit_and_the_load(tmp_path):
    env = common.environment("cpu", 1)
    assert env["commit"] == common.git_commit() and env["commit"] != "unknown"  # the tests run in the checkout
    assert any(k.startswith("load average") for k in env)
    del env["commit"]  # an env made without it still gets it
    json_path, md_path = common.save_results(tmp_path, "x", env, {}, [], "table")
    assert json.loads(open(json_path).read())["env"]["commit"] == common.git_commit()
    assert f"- commit: {common.git_commit()}\n" in open(md_path).read()


@pytest.fixture
def titles(monkeypatch):
    """The titles (axes and figure) of every figure a bench script saves; nothing is written."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    seen = []

    def savefig(fig, *args, **kwargs):
        texts = [ax.get_title() for ax in fig.axes] + [fig._suptitle.get_text() if fig._suptitle else ""]
        seen.append(" ".join(t for t in texts if t))
    monkeypatch.setattr(Figure, "savefig", savefig)
    return seen


def expected_title(env, model):
    return f"{model} | {env['device']} | {env['date']} | commit {env['commit']}"


def test_every_bench_plot_is_titled_with_model_device_date_and_commit(tmp_path, titles):
    from bench import lora_rank_sweep, memory, peft_methods
    env = common.environment("cpu", 1)
    title = common.plot_title(env, "GPT 1L 2H 32d")
    assert title == expected_title(env, "GPT 1L 2H 32d")
    phases = {p: {"median": 1.0} for p in ("fwd", "bwd", "opt")}
    lora_rank_sweep.chart([dict(name="split-r1", **phases)], str(tmp_path / "a.png"), title)
    memory.chart([dict(mode="lora", B=1, T=t, measured=1e9, predicted=1e9) for t in (16, 32)], str(tmp_path / "b.png"),
                 title)
    curve = dict(step=[0, 1], train=[2.0, 1.0], val_step=[0, 1], val=[2.0, 1.5])
    peft_methods.plot([dict(row="lora r=1", curve=curve)], dict(rows=["lora r=1"]), str(tmp_path / "c.png"), title)
    assert len(titles) == 3 and all(title in t for t in titles)


def test_the_rank_sweep_titles_its_plot_with_the_run_it_saved(tmp_path, titles):
    from bench import lora_rank_sweep
    lora_rank_sweep.main(TINY + ["--ranks", "1", "--modes", "split", "--inprocess", "--out_dir", str(tmp_path)])
    env = json.loads((tmp_path / "cpu_lora_rank_sweep.json").read_text())["env"]
    assert titles == [expected_title(env, "GPT 1L 2H 32d")]
