"""What every bench/ script shares besides timing: the command line with per-device defaults, the model
and batch it builds, and the results it writes (a markdown table, <out_dir>/<device>_<name>.{json,md}).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from tools.atomic import atomic_path  # noqa: E402

# GPT-2 family shapes: (n_layer, n_head, n_embd)
PRESETS = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
           "gpt2-xl": (48, 25, 1600)}


# ---- device ---------------------------------------------------------------------------------------

def pick_device(name="auto"):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here; use --device cpu")
    return name


def device_label(device):
    """'cpu' or e.g. 'cuda-NVIDIA-H100-80GB-HBM3': safe in a file name."""
    if not device.startswith("cuda"):
        return "cpu"
    return "cuda-" + re.sub(r"[^A-Za-z0-9.]+", "-", torch.cuda.get_device_name(device)).strip("-")


def cpu_threads(requested=None):
    """The cores this process may use (2 here); torch's default can differ in containers, so set it."""
    n = requested or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(n)
    return n


def parse_dtype(name, device):
    dtypes = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
              "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in dtypes:
        raise SystemExit(f"--dtype {name!r}: use one of fp32, bf16, fp16")
    if device == "cpu" and dtypes[name] != torch.float32:
        raise SystemExit(f"--dtype {name} on CPU: CPU timings here are fp32 only (16-bit matmuls on CPU are "
                         f"emulated or unrepresentative); use --dtype fp32")
    return dtypes[name]


# ---- the command line every script shares ------------------------------------------------------

def add_common_args(parser, model_args=True):
    """Device, dtype, iterations, output; and (model_args) the GPT shape and batch."""
    p = parser
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: bf16 autocast on CUDA, fp32 on CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on for CUDA, off for CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 5 CUDA, 1 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 CUDA, 5 CPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores this process may use)")
    p.add_argument("--out_dir", default=os.path.join(ROOT, "bench", "results"))
    if model_args:
        p.add_argument("--preset", default="gpt2", choices=sorted(PRESETS), help="GPT shape (n_layer, n_head, n_embd)")
        p.add_argument("--n_layer", type=int, default=None)
        p.add_argument("--n_head", type=int, default=None)
        p.add_argument("--n_embd", type=int, default=None)
        p.add_argument("--vocab_size", type=int, default=50304)
        p.add_argument("--B", type=int, default=None, help="batch size (default 16 CUDA, 2 CPU)")
        p.add_argument("--T", type=int, default=None, help="sequence length (default 1024 CUDA, 128 CPU)")
        p.add_argument("--targets", default="c_attn,c_proj,c_fc",
                       help="LoRA targets, comma separated module names (c_proj matches attn.c_proj and mlp.c_proj)")
        p.add_argument("--alpha", type=float, default=16.0)
    return p


def resolve_args(args):
    """Fill the per-device defaults in place; returns a plain dict (picklable, for the child processes)."""
    args.device = pick_device(args.device)
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    parse_dtype(args.dtype, args.device)  # fail early on a bad dtype
    args.compile = cuda if args.compile is None else args.compile
    args.warmup = (5 if cuda else 1) if args.warmup is None else args.warmup
    args.iters = (20 if cuda else 5) if args.iters is None else args.iters
    if args.iters < 1:
        raise SystemExit(f"--iters {args.iters}: need at least one timed iteration")
    args.threads = cpu_threads(args.threads)
    if hasattr(args, "preset"):
        L, H, C = PRESETS[args.preset]
        args.n_layer, args.n_head, args.n_embd = args.n_layer or L, args.n_head or H, args.n_embd or C
        if args.n_embd % args.n_head:
            raise SystemExit(f"--n_embd {args.n_embd} is not a multiple of --n_head {args.n_head}")
        args.B = args.B or (16 if cuda else 2)
        args.T = args.T or (1024 if cuda else 128)
        args.targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    return vars(args)


def make_gpt(cfg):
    """Our GPT of cfg's shape on cfg's device (fp32 weights: autocast does the low precision), seeded."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    config = GPTConfig(block_size=max(cfg["T"], 1024), vocab_size=cfg["vocab_size"], n_layer=cfg["n_layer"],
                       n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=0.0)
    return GPT(config).to(cfg["device"])


def random_batch(cfg):
    """(idx, targets), both (B, T) int64: random tokens, since timing does not depend on the text."""
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, cfg["vocab_size"], (cfg["B"], cfg["T"] + 1), generator=g)
    return idx[:, :-1].to(cfg["device"]), idx[:, 1:].to(cfg["device"])


# ---- reporting ------------------------------------------------------------------------------------

def fmt(x):
    if x is None:
        return "-"
    return f"{x:,.1f}" if isinstance(x, float) else f"{x:,}" if isinstance(x, int) else str(x)


def si(x, unit=""):
    """1.23e12 -> '1.23 T'."""
    if x is None:
        return "-"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}"


def noise_note(info):
    """'0' when every iteration was clean; else how many were re-run, and NOISY if none was clean."""
    return "NOISY" if info["noisy"] else str(info["discarded"])


def markdown_table(rows, columns):
    """rows: list of dicts; columns: list of (header, key, formatter or None)."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join((f or fmt)(r.get(k)) for _, k, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


# ---- what a train.py run printed (bench scripts that start train.py read it) ----------------------------

PEAK_LINE = re.compile(r"peak memory measured: ([0-9.]+) GB")


def train_py_peak_gb(output):
    """The peak memory a train.py run printed after its second step ('peak memory measured: X GB (...)': the peak
    RSS above the process before the model on CPU, max_memory_allocated on CUDA), in GB; None when it printed none."""
    found = PEAK_LINE.search(output)
    return float(found.group(1)) if found else None


# ---- the record of a result -----------------------------------------------------------------------------------

def git_commit(root=ROOT):
    """The short hash of HEAD, with '+dirty' when tracked files other than bench/results differ from it (a result
    then comes from code that no commit holds); 'unknown' outside a git checkout or without git."""
    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "unknown"
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if changed.returncode != 0 or changed.stdout.strip() else "")


def model_label(cfg):
    """'GPT 12L 12H 768d' for the GPT of cfg's shape (what a plot's title names)."""
    return f"GPT {cfg['n_layer']}L {cfg['n_head']}H {cfg['n_embd']}d"


def plot_title(env, model):
    """The title of every bench plot: which model, on which device, when, from which commit."""
    return f"{model} | {env['device']} | {env['date']} | commit {env.get('commit', 'unknown')}"


def environment(device, threads):
    env = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), device=device_label(device), torch=torch.__version__,
               python=sys.version.split()[0], commit=git_commit())
    if hasattr(os, "getloadavg"):  # other processes on the machine make CPU timings noisy: record how busy it was
        env["load average at the end, 1/5/15 min (this run included)"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu_threads"] = threads
        env["cpu"] = _cpu_model()
    return env


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def save_results(out_dir, name, env, args, rows, markdown, extra=None, command=""):
    """Write <out_dir>/<device>_<name>.json and .md atomically; returns the two paths. Both record the environment,
    the git commit included (added here when `env` lacks it)."""
    env = env if "commit" in env else dict(env, commit=git_commit())
    base = os.path.join(out_dir, f"{env['device']}_{name}")
    payload = dict(env=env, args=args, rows=rows, **(extra or {}))
    with atomic_path(base + ".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1, default=str)
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    with atomic_path(base + ".md") as tmp:
        with open(tmp, "w") as f:
            f.write(f"# {name}\n\n{header}\n- command: `{command}`\n\n{markdown}\n")
    return base + ".json", base + ".md"
