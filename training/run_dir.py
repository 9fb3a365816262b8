"""Who may write into an out_dir: the run that made it. A run never writes over what it did not create unless asked.

A new run (init_from='scratch', or a model to fine-tune) refuses an out_dir that holds another run's files, and
an out_dir that is (or holds) a model it loads: init_from itself, and followed back, the base each out_dir records
and each adapter folder names (run_inputs), even with overwrite=True, whose deletion would leave the run nothing to
load. The refusal gives the commands that proceed: resume that run, or replace it with --overwrite=True. A resume
owns its out_dir: its log.jsonl is cut back to the steps before the checkpoint, so the steps it runs again are
logged once.

One run at a time: with lock=True the master process holds an flock on out_dir/.lock for its whole life (the
kernel drops it when the process ends, however it ends), so a second run started into the same out_dir, even at
the same moment, is refused in one line. overwrite=True removes the previous run's files only once every check has
passed: with clear_later=True, only when the caller calls claim.clear() (train.py: after the model and the data
have loaded), so a run that cannot start deletes nothing.
"""
import atexit
import errno
import json
import math
import os
import shlex
import shutil
import sys
from pathlib import Path

from tools.atomic import LOCK_NAME, atomic_path, lock_file, remove_stale_temps, unlock_file
from tools.errors import UserError

RUN_FILES = ("ckpt.pt", "log.jsonl", "adapter", "merged", "merged.gguf")  # what train.py writes into out_dir
_held = {}  # {resolved out_dir: fd of its lock file}: the out_dirs this process holds


def _command(argv, **flags):
    """`python train.py ARGV` with `flags` set (replacing those keys if argv had them)."""
    keep = [a for a in argv if not any(a.startswith(f"--{k}=") for k in flags)]
    return shlex.join(["python", "train.py", *keep, *(f"--{k}={v}" for k, v in flags.items())])


def _inside(path, folder):
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def run_inputs(init_from):
    """[(path, how this run reaches it)]: the local files and folders a run from `init_from` loads: init_from, and
    followed back, the base a training out_dir (or ckpt.pt) records and the base_model_name_or_path an adapter
    folder names. Hub names and missing paths are left out (nothing local to protect)."""
    from training.checkpoint import CKPT_NAME, read_checkpoint
    found, todo = [], [(init_from, "init_from")]
    while todo:
        spec, how = todo.pop()
        if not spec or str(spec) in ("scratch", "resume"):
            continue
        path = Path(os.fspath(spec)).expanduser()
        if not path.exists() or any(path.resolve() == p.resolve() for p, _ in found):
            continue
        found.append((path, how))
        if (path / CKPT_NAME).is_file() or (path.is_file() and path.suffix == ".pt"):
            base = read_checkpoint(path).get("base")
            todo.append((base, f"the base of {path}"))
        elif path.is_dir() and (path / "adapter_config.json").is_file():
            try:
                base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            except (ValueError, AttributeError):
                continue  # loading it says what is wrong with it
            todo.append((base, f"the base of the adapter {path}"))
    return found


def lock_out_dir(out_dir):
    """Hold out_dir for this process (an flock on out_dir/.lock, made with the folder if need be); a second process
    is refused by name. Reentrant: a process that holds it already just goes on. The lock file is removed at exit."""
    out = Path(out_dir).resolve()
    if str(out) in _held:
        return
    path = out / LOCK_NAME
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = lock_file(path)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):  # tools/errors.py says what to do
            raise OSError(e.errno, f"out_dir {str(out_dir)!r} is not writable ({os.strerror(e.errno)})") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise OSError(e.errno, f"out_dir {str(out_dir)!r} is not writable ({os.strerror(e.errno)}): choose "
                                   f"another --out_dir") from None
        raise
    if fd is None:
        raise UserError(f"out_dir {str(out_dir)!r} is in use by another train.py run (it holds {path}): wait for that "
                         f"run to end, or choose another --out_dir")
    _held[str(out)] = fd


def release_out_dir(out_dir):
    """Let another run have out_dir (the lock file goes, then the lock)."""
    out = Path(out_dir).resolve()
    fd = _held.pop(str(out), None)
    if fd is not None:
        unlock_file(out / LOCK_NAME, fd)


@atexit.register
def _release_all():
    for out in list(_held):
        release_out_dir(out)


class Claim:
    """What claim_out_dir decided: `previous`, the files of the run to replace (overwrite=True), removed by clear()."""

    def __init__(self, out_dir, previous=(), master=True):
        self.out_dir, self.previous, self.master = Path(out_dir), list(previous), master

    def clear(self):
        if not (self.master and self.previous):
            return
        print(f"overwrite=True: removing the previous run's {', '.join(self.previous)} from {self.out_dir}")
        for name in self.previous:
            path = self.out_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        self.previous = []

    def release(self):
        if self.master:
            release_out_dir(self.out_dir)


def claim_out_dir(out_dir, init_from, overwrite, argv=None, master=True, lock=False, clear_later=False):
    """Check out_dir before anything is written into it; returns a Claim. With overwrite, `master` removes the
    previous run's files after every check has passed: now, or with clear_later=True when claim.clear() is called.
    lock=True: `master` holds out_dir until claim.release() or the end of the process (lock_out_dir).

    Every DDP rank calls this (so that all refuse alike); only the master process changes anything."""
    argv = sys.argv[1:] if argv is None else argv
    out = Path(out_dir)
    elsewhere = f"Give the new run another out_dir: {_command(argv, out_dir=str(out).rstrip('/') + '-finetune')}"
    if init_from not in ("scratch", "resume"):
        for path, how in run_inputs(init_from):
            if not _inside(path, out):
                continue
            if how == "init_from":
                raise UserError(f"out_dir {out_dir!r} holds the model this run loads (init_from={init_from!r}): "
                                 f"its files would be replaced by this run's. {elsewhere}")
            raise UserError(f"out_dir {out_dir!r} holds {path}, {how}, which this run (init_from={init_from!r}) "
                             f"loads: replacing it would leave nothing to load, even with overwrite=True. {elsewhere}")
    if master and lock:
        lock_out_dir(out)  # from here on no other run can start into out_dir: the checks below stay true
    claim = Claim(out, master=master)
    try:
        _check_previous_run(claim, out_dir, init_from, overwrite, argv)
    except BaseException:
        if lock:
            claim.release()
        raise
    if not clear_later:
        claim.clear()
    return claim


def _check_previous_run(claim, out_dir, init_from, overwrite, argv):
    """Set claim.previous to the files of the run in out_dir that overwrite=True replaces; refuse without it."""
    out = claim.out_dir
    if claim.master:
        for folder in (out, out / "adapter", out / "merged"):
            for name in remove_stale_temps(folder):
                print(f"removed {folder / name}, the temp file of a write that was killed")
    if init_from == "resume":
        return
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not overwrite:
        resume = (f"continue it with: {_command(argv, init_from='resume')}; or "
                  if (out / "ckpt.pt").exists() else "")
        raise UserError(f"out_dir {out_dir!r} holds another run ({', '.join(found)}): {resume}replace it with: "
                         f"{_command(argv, overwrite=True)}; or choose another --out_dir")
    claim.previous = found


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


def read_log(out_dir, objective=None):
    """(path, the records of out_dir/log.jsonl as dicts), skipping a line torn by a kill in the middle of its write.
    objective names the kind of run the caller reads, for the message when there is no log (None: any run)."""
    path = Path(out_dir) / "log.jsonl"
    if not path.is_file():
        run = f"a {objective.upper()} run (train.py objective={objective!r})" if objective else "a train.py run"
        raise FileNotFoundError(f"{path}: no such file; name the out_dir of {run}")
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a torn line
                continue
            if isinstance(record, dict):
                records.append(record)
    return path, records


def finite_or_none(record):
    """A log record as strict JSON allows: NaN and inf become null (json.dumps would write bare NaN)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}

