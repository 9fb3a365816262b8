"""Every path that only a CUDA GPU exercises, checked in one command on one GPU (a few minutes, under 8):

    python -m bench.cuda_check                   # or python bench/cuda_check.py; --checks sdpa_packed,fsdp for some

The checks (CHECKS: lora_bf16, dora_bf16, compile, fused_adamw, sdpa_packed, fsdp, fp16, mfu), what each measures
and its tolerance, are in bench/cuda_paths.py. Each check is a row: passed or failed, what it measured, seconds. A
failing check does not stop the others (its row keeps the exception's last line) and the command exits 1 if any
failed. The rows go to bench/results/<device>_cuda_check.{md,json} with the GPU, torch, CUDA, the date and the git
commit. Without CUDA it says so in one line and exits 0. The checks take a context (device, dtypes, sizes, compile
backend), so the tests run them on the CPU in fp32 at tiny sizes (tests/test_cuda_check.py).
"""
import argparse
import gc
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # python bench/cuda_check.py without the venv's .pth file
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from bench import common  # noqa: E402
from bench.cuda_paths import CHECKS, cuda_context, sync  # noqa: E402


# ---- running and reporting ----------------------------------------------------------------------------------------

def last_line(error):
    """The traceback's last line ('AssertionError: ...'), and where it was raised."""
    frame = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    where = f" (at {os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
    return traceback.format_exception_only(type(error), error)[-1].strip() + where


def run_checks(checks, ctx):
    """Run every check (name -> fn(ctx, measured)); a failing one is recorded and the next runs. Returns the rows."""
    rows = []
    for name, fn in checks.items():
        measured, t0 = {}, time.perf_counter()
        try:
            fn(ctx, measured)
            sync(ctx["device"])  # an asynchronous CUDA error belongs to this check
            status, error = "passed", ""
        except Exception as e:  # noqa: BLE001 - any failure is this check's, and the others still run
            status, error = "failed", last_line(e)
        row = dict(check=name, status=status, measured=measured, seconds=time.perf_counter() - t0, error=error)
        rows.append(row)
        print(f"{name:>12}: {status} in {row['seconds']:.1f}s | {format_measured(measured)}"
              + (f" | {error}" if error else ""), flush=True)
        gc.collect()
        if ctx["device"].startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def format_measured(measured):
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in measured.items())


def table(rows):
    columns = [("check", "check", None), ("result", "status", None), ("measured", "measured", format_measured),
               ("seconds", "seconds", lambda s: f"{s:.1f}"), ("error", "error", lambda e: e or "")]
    return common.markdown_table(rows, columns)


def cuda_environment(device):
    """common.environment (GPU, torch, date, commit, load) with the CUDA, cuDNN and NCCL versions."""
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except (AttributeError, RuntimeError, TypeError):
        nccl = "-"
    return dict(common.environment(device, common.cpu_threads()), cuda=torch.version.cuda, nccl=nccl,
                cudnn=torch.backends.cudnn.version(),
                capability=".".join(map(str, torch.cuda.get_device_capability(device))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda or cuda:N")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma separated, of {','.join(CHECKS)}")
    p.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--name", default="cuda_check", help="results file name: <device>_<name>.{json,md}")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench.cuda_check: no CUDA device here (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda or 'none'}): nothing to check; run it on a machine with an NVIDIA GPU")
        return 0
    names = [n.strip() for n in args.checks.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown or not names:
        raise SystemExit(f"--checks {args.checks}: choose from {','.join(CHECKS)}")
    ctx = cuda_context(args.device)
    print(f"cuda_check on {torch.cuda.get_device_name(args.device)}: {', '.join(names)}", flush=True)
    rows = run_checks({n: CHECKS[n] for n in names}, ctx)
    env = cuda_environment(args.device)
    failed = [r["check"] for r in rows if r["status"] == "failed"]
    md = (f"{len(rows) - len(failed)} of {len(rows)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else "")
          + ". What each checks, and its tolerance: bench/cuda_paths.py's docstring.\n\n" + table(rows))
    paths = common.save_results(args.out_dir, args.name, env, vars(args), rows, md,
                                command=" ".join(["python -m bench.cuda_check", *argv]))
    print("wrote", *paths)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
