"""tools/plot.py: which panels a log.jsonl gets, the PNG it writes, several runs overlaid, its one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

from tools.errors import UserError
from tools.plot import describe, figure, load_run, main, panels

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# a language-model run: every step's keys, val_loss and HellaSwag at the eval steps 0 and 2
LM = [
    {"step": 0, "val_loss": 10.8, "hellaswag_acc_norm": 0.25, "train_loss": 10.9, "lr": 1e-4, "grad_norm": 3.0,
     "dt_ms": 120.0, "tok_per_s": 4000.0},
    {"step": 1, "train_loss": 9.5, "lr": 2e-4, "grad_norm": 2.5, "dt_ms": 110.0, "tok_per_s": 4100.0},
    {"step": 2, "val_loss": 9.1, "hellaswag_acc_norm": 0.26, "train_loss": 8.7, "lr": 1e-4, "grad_norm": None,
     "dt_ms": 115.0, "tok_per_s": 4050.0},  # null: a gradient norm that was not finite
]
# a DPO run as train.py logs it: TRL's metrics every step, their eval_ twins at the eval step, "loss" / "eval_loss"
# repeating train_loss / val_loss; a key that is always null and one that is never a number
DPO = [
    {"step": 0, "val_loss": 0.69, "eval_loss": 0.69, "eval_rewards/accuracies": 0.5, "eval_rewards/margins": 0.0,
     "train_loss": 0.69, "lr": 1e-3, "grad_norm": 1.0, "dt_ms": 80.0, "tok_per_s": 60.0, "loss": 0.69,
     "rewards/accuracies": 0.5, "rewards/margins": 0.0, "kl": None, "note": "warmup", "flag": True},
    {"step": 1, "train_loss": 0.66, "lr": 9e-4, "grad_norm": 2.0, "dt_ms": 90.0, "tok_per_s": 55.0, "loss": 0.66,
     "rewards/accuracies": 0.75, "rewards/margins": 0.06, "kl": None, "note": "warmup", "flag": False},
]
TORN = '{"step": 2, "train_loss": 0.61, "lr": 8e-4, "rewa'  # the last line, cut by a kill mid-write


def write_run(folder, records, torn=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + torn)
    return folder


# ---- the panels: a pure function of the records -------------------------------------------------------------------
def test_an_lm_run_gets_loss_lr_grad_norm_and_one_panel_per_other_metric_without_timing():
    assert list(panels(LM).items()) == [
        ("loss", ["train_loss", "val_loss"]), ("lr", ["lr"]), ("grad_norm", ["grad_norm"]),
        ("hellaswag_acc_norm", ["hellaswag_acc_norm"])]


def test_a_dpo_metric_shares_its_panel_with_its_eval_twin_and_keys_that_are_never_numbers_get_none():
    assert list(panels(DPO).items()) == [
        ("loss", ["train_loss", "val_loss"]), ("lr", ["lr"]), ("grad_norm", ["grad_norm"]),
        ("rewards/accuracies", ["rewards/accuracies", "eval_rewards/accuracies"]),
        ("rewards/margins", ["rewards/margins", "eval_rewards/margins"])]


def test_a_run_without_val_steps_draws_train_loss_alone():
    assert panels([{"step": 0, "train_loss": 1.0}])["loss"] == ["train_loss"]
    assert panels([]) == {} and panels([{"step": 0, "dt_ms": 5.0}]) == {}


# ---- the figure and the PNG ---------------------------------------------------------------------------------------
def lines(fig):
    """{panel title: {line label: (steps, values)}} of a drawn figure."""
    return {ax.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
            for ax in fig.axes}


def test_main_writes_a_png_into_the_run_folder_skipping_a_torn_last_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "out-dpo", DPO, torn=TORN)
    path = main([str(run)])
    assert path == run / "log.png" and capsys.readouterr().out.strip() == str(path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.pyplot as plt
    name, title, records = load_run(run)
    assert name == "out-dpo" and title.startswith("out-dpo (20") and len(records) == 2  # the torn step 2 is not read
    drawn = lines(figure([(name, title, records)], plt))
    plt.close("all")
    assert set(drawn) == set(panels(DPO))
    assert drawn["loss"] == {"train_loss": ([0, 1], [0.69, 0.66]), "val_loss": ([0], [0.69])}
    assert drawn["rewards/margins"]["eval_rewards/margins"] == ([0], [0.0])


def test_two_runs_overlay_on_the_union_of_their_panels_labelled_by_folder(tmp_path):
    pytest.importorskip("matplotlib")
    lm, dpo = write_run(tmp_path / "lm", LM), write_run(tmp_path / "dpo", DPO)
    out = main([str(lm), str(dpo), "--out", str(tmp_path / "both.png")])
    assert out.read_bytes()[:8] == PNG_MAGIC and not (lm / "log.png").exists()
    import matplotlib.pyplot as plt
    drawn = lines(figure([load_run(lm), load_run(dpo)], plt))
    plt.close("all")
    assert list(drawn) == ["loss", "lr", "grad_norm", "hellaswag_acc_norm", "rewards/accuracies", "rewards/margins"]
    assert drawn["loss"] == {"lm train_loss": ([0, 1, 2], [10.9, 9.5, 8.7]), "lm val_loss": ([0, 2], [10.8, 9.1]),
                             "dpo train_loss": ([0, 1], [0.69, 0.66]), "dpo val_loss": ([0], [0.69])}
    assert drawn["grad_norm"]["lm grad_norm"] == ([0, 1], [3.0, 2.5])  # the null of step 2 is skipped
    assert set(drawn["rewards/accuracies"]) == {"dpo rewards/accuracies", "dpo eval_rewards/accuracies"}


def test_an_existing_png_is_replaced_only_with_overwrite(tmp_path):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "out", LM)
    (run / "log.png").write_bytes(b"someone's picture")
    with pytest.raises(UserError, match=r"log\.png exists: add --overwrite"):
        main([str(run)])
    assert (run / "log.png").read_bytes() == b"someone's picture"
    main([str(run), "--overwrite"])
    assert (run / "log.png").read_bytes()[:8] == PNG_MAGIC


def test_the_title_names_the_runs_settings_from_its_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    run = write_run(tmp_path / "out", LM)
    assert describe(run) == ""  # no checkpoint yet: the folder name alone
    torch.save({"config": {"objective": "dpo", "peft_method": "lora", "init_from": "gpt2", "lora_r": 8}},
               run / "ckpt.pt")
    assert describe(run) == "objective=dpo peft_method=lora init_from=gpt2"
    (run / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert describe(run) == ""


# ---- errors -------------------------------------------------------------------------------------------------------
def test_without_matplotlib_the_error_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(UserError, match=r"^tools\.plot needs matplotlib: pip install matplotlib$"):
        main([str(write_run(tmp_path / "out", LM))])


def test_an_empty_log_is_refused(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.raises(UserError, match=r"log\.jsonl holds no step with a number"):
        main([str(write_run(tmp_path / "out", [], torn=TORN))])


def test_a_folder_without_a_log_is_one_error_line(tmp_path):
    pytest.importorskip("matplotlib")  # (without it, that is the first error)
    result = subprocess.run([sys.executable, "-m", "tools.plot", str(tmp_path / "nothing")], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {tmp_path / 'nothing' / 'log.jsonl'}: no such file")
    assert not (tmp_path / "nothing").exists()  # nothing was written
