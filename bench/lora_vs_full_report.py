"""bench/lora_vs_full.py's measures of finished runs: the rank of a full fine-tuning update, each family's best
learning rate, and the tables and plots of the results.

Effective rank of an update dW = W_tuned - W_base with singular values s_1 >= s_2 >= ... (float64):
    90% rank         the fewest singular directions that hold 90% of ||dW||_F^2 = sum s_i^2
    entropy rank     exp(H(p)), p_i = s_i / sum_j s_j (Roy & Vetterli, 2007): k for k equal singular values,
                     between 1 and k otherwise
A LoRA update of rank r has both at most r; Biderman et al. (2024) find full fine-tuning updates 10-100x above the
ranks LoRA uses.
"""
import json
import math
import os
import re
import statistics

import torch

from bench.common import environment, markdown_table, plot_title, save_results
from tools.errors import UserError


# ---- effective rank of an update -------------------------------------------------------------------------------
def rank_measures(s, share=0.9):
    """(90% rank, entropy effective rank) of singular values s (1-D); (0, 0.0) for a zero update."""
    s = torch.as_tensor(s, dtype=torch.float64).flatten().sort(descending=True).values
    energy = s.square()
    if energy.sum() == 0:
        return 0, 0.0
    cumulative = energy.cumsum(0) / energy.sum()
    rank = int((cumulative < share - 1e-12).sum()) + 1  # the first k with cumulative[k - 1] >= share
    p = s / s.sum()
    p = p[p > 0]
    return rank, math.exp(-(p * p.log()).sum().item())


def block_linears(model):
    """{name: nn.Linear} of the Linear layers inside the numbered blocks (lm_head and embeddings are not)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and re.search(r"\.\d+\.", name)}


def update_ranks(base, tuned):
    """Per projection name (the module name after its block number: 'self_attn.q_proj', 'mlp.down_proj'), the mean
    over blocks of the 90% rank and the entropy rank of W_tuned - W_base; rows of a table."""
    tuned_linears = block_linears(tuned)
    per_name = {}
    for name, layer in block_linears(base).items():
        delta = tuned_linears[name].weight.detach().double() - layer.weight.detach().double()  # (out, in)
        ranks = rank_measures(torch.linalg.svdvals(delta))
        per_name.setdefault(re.sub(r"^.*?\.\d+\.", "", name), []).append((ranks, tuple(delta.shape)))
    return [dict(projection=name, shape="x".join(map(str, items[0][1])), max_rank=min(items[0][1]),
                 rank90=statistics.fmean(r[0] for r, _ in items), entropy_rank=statistics.fmean(r[1] for r, _ in items),
                 blocks=len(items)) for name, items in per_name.items()]


# ---- choosing a learning rate ----------------------------------------------------------------------------------
def best_rate(runs):
    """The learning rate of the run with the highest held-out accuracy at the end; ties: the lowest best val loss.
    A run that diverged (accuracy None) never wins; None when every run did."""
    finished = [r for r in runs if r["after"] is not None]
    if not finished:
        return None
    return min(finished, key=lambda r: (-r["after"], r["best_val"]))["lr"]


# ---- tables ----------------------------------------------------------------------------------------------------
def mean_std(values, digits=3):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def row_runs(runs, task, row, lr):
    return sorted((r for r in runs if r["task"] == task and r["row"] == row and r["lr"] == lr), key=lambda r: r["seed"])


def task_rows(runs, task, rows, rate_of):
    """One table row per row name that has runs at its family's chosen rate (rate_of(task, row)), seeds pooled."""
    table = []
    for row in rows:
        got = row_runs(runs, task, row, rate_of(task, row))
        if not got:
            continue
        ok = [r for r in got if r["after"] is not None]
        table.append(dict(
            task=task, row=row, lr=got[0]["lr"], params=got[0]["params"],
            before=mean_std([r["before"] for r in got]),
            after=mean_std([r["after"] for r in ok]) if ok else "diverged",
            best_val=mean_std([r["best_val"] for r in ok], 4), forgetting=mean_std([r["forgetting"] for r in ok], 4),
            questions=mean_std([r["questions"] for r in ok]),
            peak_gb=median_or_none([r["peak_gb"] for r in got]),
            step_s=median_or_none([r["step_s"] for r in got]), seeds=",".join(str(r["seed"]) for r in got)))
    return table


def sweep_rows(runs, task, sweeps, chosen):
    """The learning-rate sweep of each family (seed = the first seed): one row a rate."""
    table = []
    for family, row in sweeps.items():
        for r in sorted((r for r in runs if r["task"] == task and r["row"] == row and r.get("sweep")),
                        key=lambda r: r["lr"]):
            table.append(dict(task=task, row=row, lr=r["lr"], best_val=r["best_val"], forgetting=r["forgetting"],
                              after="diverged" if r["after"] is None else f"{r['after']:.3f}",
                              chosen="yes" if chosen.get(family) == r["lr"] else ""))
    return table


def num(digits):
    return lambda x: "-" if x is None else f"{x:.{digits}f}"


TASK_COLUMNS = [("row", "row", str), ("lr", "lr", lambda x: f"{x:g}"),
                ("trainable params", "params", lambda x: f"{x:,}"), ("accuracy before", "before", str),
                ("accuracy after", "after", str),
                ("best val loss", "best_val", str), ("forgetting (nats/token)", "forgetting", str),
                ("closed-question accuracy", "questions", str), ("peak GB", "peak_gb", num(2)),
                ("step s", "step_s", num(2)), ("seeds", "seeds", str)]
SWEEP_COLUMNS = [("task", "task", str), ("row", "row", str), ("lr", "lr", lambda x: f"{x:g}"),
                 ("accuracy after", "after", str), ("best val loss", "best_val", num(4)),
                 ("forgetting", "forgetting", num(4)), ("chosen", "chosen", str)]
RANK_COLUMNS = [("task", "task", str), ("projection", "projection", str), ("shape (out x in)", "shape", str),
                ("full rank", "max_rank", str), ("90% energy rank (mean over blocks)", "rank90", num(1)),
                ("entropy effective rank (mean)", "entropy_rank", num(1)),
                ("90% rank / 16 (LoRA r=16)", "rank90", lambda x: f"{x / 16:.1f}x")]


def markdown(tables, sweeps, ranks, notes):
    """The whole report: a table per task, the sweep, the ranks; notes: lines said before them."""
    parts = ["\n".join(f"- {line}" for line in notes)]
    for task, rows in tables.items():
        parts.append(f"## {task}\n\n{markdown_table(rows, TASK_COLUMNS)}")
    parts.append(f"## learning-rate sweep\n\n{markdown_table(sweeps, SWEEP_COLUMNS)}")
    parts.append(f"## effective rank of the full fine-tuning update (the best full run of each task)\n\n"
                 f"{markdown_table(ranks, RANK_COLUMNS)}")
    return "\n\n".join(parts)


# ---- the results file -----------------------------------------------------------------------------------------
def write(cfg, state, rows, sweeps, rate_of, notes, extra, command, model, plots=False):
    """<out_dir>/<device>_<name>.{json,md}: a table per task, the sweep, the ranks, every run's record (and extra);
    with plots the three PNGs too. Returns (tables by task, the two paths, the PNGs' paths or None)."""
    runs = state["runs"]
    tasks = [t for t in cfg["all_tasks"] if any(r["task"] == t for r in runs)]
    tables = {t: task_rows(runs, t, rows, rate_of) for t in tasks}
    swept = [row for t in tasks for row in sweep_rows(runs, t, sweeps, state["rates"].get(t, {}))]
    ranks = [dict(task=t, **r) for t in tasks for r in state["ranks"].get(t, {}).get("rows", [])]
    env = environment("cpu", cfg["threads"])
    paths = save_results(cfg["out_dir"], cfg["name"], env, {k: v for k, v in cfg.items() if k not in ("task_table",
                                                                                                      "data")},
                         [r for t in tables.values() for r in t], markdown(tables, swept, ranks, notes),
                         extra=dict(extra, runs=runs, rates=state["rates"], ranks=state["ranks"]), command=command)
    base = os.path.join(cfg["out_dir"], f"{env['device']}_{cfg['name']}")
    return tables, paths, plot_all(runs, tasks, rows, rate_of, sweeps, base, plot_title(env, model)) if plots else None


def previous(path, settings, flag):
    """--resume and --costs (flag): the runs, rates and ranks of the results file at path (None if there is none),
    which must have been made with the same settings."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        results = json.load(f)
    if results.get("settings") != settings:
        raise UserError(f"{flag}: {path} was made with other settings ({results.get('settings')}, now {settings}); "
                        f"use the same settings, or run without {flag} to start again")
    return dict({k: results[k] for k in ("runs", "rates", "ranks")}, commit=results["env"]["commit"],
                costs=results.get("costs"))


# ---- plots -----------------------------------------------------------------------------------------------------
def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def panels(plt, tasks, title):
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 4.4), squeeze=False)
    fig.suptitle(title, fontsize=8)
    return fig, axes[0]


def save(fig, plt, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legends outside the panels too
    plt.close(fig)
    return path


def plot_all(runs, tasks, rows, rate_of, sweeps, base, title):
    """Three PNGs (paths from base + suffix), or None without matplotlib: learning vs forgetting, accuracy over
    steps, accuracy vs learning rate."""
    plt = pyplot()
    if plt is None or not tasks:
        return None
    # ten distinct colors, then the same ten with another marker: every row told apart in the legend
    style = {row: dict(color=plt.cm.tab10(i % 10), marker="os^D"[i // 10 % 4]) for i, row in enumerate(rows)}
    fig, axes = panels(plt, tasks, title)
    for ax, task in zip(axes, tasks):
        for row in rows:
            got = [r for r in row_runs(runs, task, row, rate_of(task, row)) if r["after"] is not None]
            if got:
                x = [r["forgetting"] for r in got]
                y = [r["after"] for r in got]
                ax.errorbar(statistics.fmean(x), statistics.fmean(y), xerr=statistics.stdev(x) if len(x) > 1 else None,
                            yerr=statistics.stdev(y) if len(y) > 1 else None, linestyle="none", label=row, **style[row])
        # symlog: forgetting spans 0.002 to 10 nats across methods; linear below 0.01 (it may be <= 0 in principle)
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set(title=task, xlabel="forgetting: reply NLL - base's (nats/token)", ylabel="held-out accuracy after")
        ax.grid(alpha=0.3)
    if axes[-1].get_legend_handles_labels()[0]:  # a legend, not labels at the points: those overlap
        axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    paths = [save(fig, plt, base + "_learning_vs_forgetting.png")]
    fig, axes = panels(plt, tasks, title)
    for ax, task in zip(axes, tasks):
        for row in rows:
            got = row_runs(runs, task, row, rate_of(task, row))
            if got:
                ax.plot(got[0]["acc_steps"], got[0]["accuracy"], markersize=4, label=row, **style[row])
        ax.set(title=f"{task} (first seed)", xlabel="step", ylabel="held-out accuracy")
        ax.grid(alpha=0.3)
    if axes[-1].get_legend_handles_labels()[0]:
        axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    paths.append(save(fig, plt, base + "_accuracy_curves.png"))
    fig, axes = panels(plt, tasks, title)
    for ax, task in zip(axes, tasks):
        for row in sweeps.values():
            swept = sorted((r for r in runs if r["task"] == task and r["row"] == row and r.get("sweep")),
                           key=lambda r: r["lr"])
            if not swept:
                continue
            line, = ax.plot([r["lr"] for r in swept], [r["after"] if r["after"] is not None else float("nan")
                                                        for r in swept], marker="o", label=f"{row} (first seed)")
            seeds = [r["after"] for r in row_runs(runs, task, row, rate_of(task, row)) if r["after"] is not None]
            if len(seeds) > 1:
                ax.errorbar(rate_of(task, row), statistics.fmean(seeds), yerr=statistics.stdev(seeds), fmt="s",
                            color=line.get_color(), capsize=4, label=f"{row}: mean ± std of {len(seeds)} seeds")
        ax.set(title=task, xscale="log", xlabel="learning rate", ylabel="held-out accuracy after")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    paths.append(save(fig, plt, base + "_accuracy_vs_lr.png"))
    return paths
