"""Draw a train.py run's log.jsonl to a PNG: a grid of panels, one per metric, step on the x axis.

    python -m tools.plot out-dpo-shakespeare                   # writes out-dpo-shakespeare/log.png
    python -m tools.plot out-a out-b --out compare.png         # two runs overlaid, labelled by folder name

The panels: loss (train_loss and val_loss), lr, grad_norm, then one per other key that holds a number somewhere in
the log, titled by the key, in the order the keys first appear. A metric's eval_ twin shares its panel (DPO's
eval_rewards/margins with rewards/margins, GRPO's eval_reward with reward), dashed. Timing (dt_ms, tok_per_s, mfu)
is left out: it says how fast a run went, not how well it learned. A null (non-finite) value is skipped.

For runs without wandb. matplotlib is optional (pip install matplotlib) and draws with Agg: no display needed.
"""
import argparse
import math
import pickle
import sys
from datetime import date
from itertools import cycle
from pathlib import Path

from tools.atomic import atomic_path
from tools.errors import UserError
from training.run_dir import read_log

# ---- which panel a key is drawn on --------------------------------------------------------------------------------
# log key -> panel title; None: not drawn. A key missing here gets its own panel titled by the key, except that an
# eval_ key joins the panel of the key it is the val twin of.
PANEL = {
    "train_loss": "loss", "val_loss": "loss",
    "lr": "lr",
    "grad_norm": "grad_norm",
    "step": None,  # the x axis
    "dt_ms": None, "tok_per_s": None, "mfu": None,  # timing
    "loss": None, "eval_loss": None,  # DPO's copies of train_loss and val_loss
}
EVAL = "eval_"
SETTINGS = ("objective", "peft_method", "init_from")  # what the figure title says a run was, from its checkpoint


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def panel_of(key):
    return PANEL[key] if key in PANEL else key.removeprefix(EVAL)


def panels(records):
    """{panel title: [log keys]}, in drawing order, for the keys that hold a number in some record: the table's
    keys first, then the others as they first appear, a panel's train key before its eval_ twin."""
    seen = dict.fromkeys(key for record in records for key, value in record.items() if is_number(value))
    rest = sorted((key for key in seen if key not in PANEL), key=lambda key: key.startswith(EVAL))  # stable
    grid = {}
    for key in [key for key in PANEL if key in seen] + rest:
        if panel_of(key) is not None:
            grid.setdefault(panel_of(key), []).append(key)
    return grid


def series(records, key):
    """(steps, values) of the records that hold a number for key."""
    points = [(r["step"], r[key]) for r in records if is_number(r.get(key)) and is_number(r.get("step"))]
    return [s for s, _ in points], [v for _, v in points]


# ---- what a run was -----------------------------------------------------------------------------------------------
def describe(out_dir):
    """'objective=dpo peft_method=lora init_from=...' from the settings saved in out_dir/ckpt.pt; '' when there is
    no readable checkpoint (a run before its first save): the title then has the folder name alone."""
    path = Path(out_dir) / "ckpt.pt"
    if not path.is_file():
        return ""
    import torch  # only here: a log without a checkpoint is drawn without loading torch
    try:  # mmap: the pickle is read, the tensors stay on disk
        config = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("config") or {}
    except (OSError, RuntimeError, pickle.UnpicklingError, AttributeError):  # truncated or not train.py's
        return ""
    return " ".join(f"{key}={config[key]}" for key in SETTINGS if key in config)


def load_run(out_dir):
    """(name, title line, records) of one out_dir."""
    path, records = read_log(out_dir)
    if not panels(records):
        raise UserError(f"{path} holds no step with a number to draw yet: wait for the run's first step, or name "
                        f"another out_dir")
    name = Path(out_dir).resolve().name
    day = date.fromtimestamp(path.stat().st_mtime).isoformat()  # when the log was last written
    what = describe(out_dir)
    return name, f"{name}: {what} ({day})" if what else f"{name} ({day})", records


# ---- the figure ---------------------------------------------------------------------------------------------------
def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("tools.plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def figure(runs, plt):
    """One figure of every run's panels; runs: [(name, title line, records)]."""
    grid = {}  # the union of the runs' panels, each with the union of its keys
    for _, _, records in runs:
        for title, keys in panels(records).items():
            grid.setdefault(title, {}).update(dict.fromkeys(keys))
    cols = min(3, len(grid))
    rows = math.ceil(len(grid) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3 * rows + 0.3 * len(runs)), squeeze=False,
                             layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, keys) in zip(axes.flat, grid.items()):
        for color, (name, _, records) in zip(cycle(colors), runs):  # a color per run
            for style, key in zip(cycle(("-", "--", ":", "-.")), keys):  # a line style per key
                steps, values = series(records, key)
                if not steps:  # this run does not log this key
                    continue
                label = key if len(runs) == 1 else f"{name} {key}"
                ax.plot(steps, values, style, color=color, label=label, marker="o" if len(steps) <= 30 else None,
                        markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(ax.lines) > 1 or len(runs) > 1:
            ax.legend(fontsize=7)
    for ax in axes.flat[len(grid):]:  # the grid's empty cells
        ax.remove()
    fig.suptitle("\n".join(line for _, line, _ in runs))
    return fig


def save(fig, path, plt):
    """Write the figure to path as a PNG, atomically."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)  # format: the temp file's name ends in .tmp
    finally:
        plt.close(fig)


# ---- command line -------------------------------------------------------------------------------------------------
def main(argv):
    """Draw the runs' logs; returns the path written."""
    parser = argparse.ArgumentParser(prog="python -m tools.plot", description=__doc__.split("\n")[0])
    parser.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="train.py out_dirs; several are overlaid")
    parser.add_argument("--out", help="the PNG to write (default: the first OUT_DIR's log.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.out_dirs[0]) / "log.png"
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {args.out}: tools.plot writes PNG files; name a .png file")
    plt = pyplot()
    runs = [load_run(out_dir) for out_dir in args.out_dirs]
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists: add --overwrite to replace it, or name another file with --out")
    save(figure(runs, plt), out, plt)
    print(out)
    return out


if __name__ == "__main__":
    from tools.errors import report_user_errors
    main(report_user_errors(sys.argv[1:]))
