"""Who may write into an out_dir: the run that made it. A run never writes over what it did not create unless asked.

A new run (init_from='scratch', or a model to fine-tune) refuses an out_dir that holds another run's files, and
an out_dir that is (or holds) the model it loads from, whose checkpoint it would replace by its own. The refusal
gives the commands that proceed: resume that run, or replace it with --overwrite=True. A resume owns its out_dir:
its log.jsonl is cut back to the steps before the checkpoint, so the steps it runs again are logged once.
"""
import json
import math
import shlex
import shutil
import sys
from pathlib import Path

from tools.atomic import atomic_path, remove_stale_temps
from tools.errors import UserError

RUN_FILES = ("ckpt.pt", "log.jsonl", "adapter", "merged")  # what train.py writes into out_dir


def _command(argv, **flags):
    """`python train.py ARGV` with `flags` set (replacing those keys if argv had them)."""
    keep = [a for a in argv if not any(a.startswith(f"--{k}=") for k in flags)]
    return shlex.join(["python", "train.py", *keep, *(f"--{k}={v}" for k, v in flags.items())])


def _inside(path, folder):
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def claim_out_dir(out_dir, init_from, overwrite, argv=None, master=True):
    """Check out_dir before anything is written into it; with overwrite, `master` removes the previous run's files.

    Every DDP rank calls this (so that all refuse alike); only the master process changes anything."""
    argv = sys.argv[1:] if argv is None else argv
    out = Path(out_dir)
    if init_from not in ("scratch", "resume") and Path(init_from).exists() and _inside(init_from, out):
        raise UserError(f"out_dir {out_dir!r} holds the model this run loads (init_from={init_from!r}): its files "
                         f"would be replaced by this run's. Give the new run another out_dir: "
                         f"{_command(argv, out_dir=str(out).rstrip('/') + '-finetune')}")
    if master:
        for folder in (out, out / "adapter", out / "merged"):
            for name in remove_stale_temps(folder):
                print(f"removed {folder / name}, the temp file of a write that was killed")
    if init_from == "resume":
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return
    if not overwrite:
        resume = (f"continue it with: {_command(argv, init_from='resume')}; or "
                  if (out / "ckpt.pt").exists() else "")
        raise UserError(f"out_dir {out_dir!r} holds another run ({', '.join(found)}): {resume}replace it with: "
                         f"{_command(argv, overwrite=True)}; or choose another --out_dir")
    if master:
        print(f"overwrite=True: removing the previous run's {', '.join(found)} from {out_dir}")
        for name in found:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def truncate_log(log_path, step):
    """Keep the records of the steps before `step` (the resumed run logs the others again); atomic."""
    log_path = Path(log_path)
    if not log_path.is_file():
        return
    def before(line):
        try:
            return json.loads(line)["step"] < step
        except (ValueError, KeyError, TypeError):  # a line torn by a kill in the middle of its write
            return False

    with open(log_path) as f:
        lines = [line for line in f if before(line)]
    with atomic_path(log_path) as tmp, open(tmp, "w") as f:
        f.writelines(lines)


def finite_or_none(record):
    """A log record as strict JSON allows: NaN and inf become null (json.dumps would write bare NaN)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}

