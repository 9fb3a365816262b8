"""The timing and memory harness shared by the bench/ scripts.

Timing. A GPU runs asynchronously: the Python call returns as soon as the kernel is queued, so a wall
clock around it measures nothing. On CUDA we record events into the stream between the phases
(forward | backward | optimizer step) and synchronise once per iteration; on CPU every op is
synchronous and time.perf_counter between phases is exact. The first iterations pay for allocator
growth, kernel autotuning and torch.compile, so `warmup` iterations are run and thrown away.
We report the median (robust to a stray slow iteration) and the spread: quartiles and min/max.

Memory. On CUDA, torch.cuda.max_memory_allocated is the peak of live tensors. On CPU there is no such
counter, so each configuration runs in a fresh process (multiprocessing "spawn") and reports that
process's peak resident set size (getrusage ru_maxrss). An idle child that only imported torch gives
the baseline to subtract: what is left is what the configuration itself needed.

FLOPs. Achieved FLOP/s = FLOPs per token (model/flops.py: 6 per trainable and 4 per frozen matmul
parameter, plus attention) x tokens/s. MFU divides that by the device's dense bf16 peak; it is only
reported on CUDA with a 16-bit dtype and a GPU from the table below.
"""
import argparse
import json
import multiprocessing as mp
import os
import re
import resource
import statistics
import sys
import time
from contextlib import nullcontext

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from atomic import atomic_path  # noqa: E402
from model.flops import flops_per_token  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
# Matched against torch.cuda.get_device_name in order: put the more specific names first.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("GH200", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", None),  # AWS's A10 variant, clocked lower; no official bf16 figure: no MFU rather than a wrong one
    ("A10", 125.0),
]

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


def peak_for_name(gpu_name):
    """Dense bf16 peak (FLOP/s) of a GPU by its torch.cuda.get_device_name, or None if not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in gpu_name:
            return tflops * 1e12 if tflops else None
    return None


def peak_flops(device, dtype):
    """The device's dense bf16 peak in FLOP/s, or None (CPU, fp32, or a GPU not in the table)."""
    if not device.startswith("cuda") or dtype not in (torch.bfloat16, torch.float16):
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def parse_dtype(name, device):
    dtypes = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
              "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in dtypes:
        raise SystemExit(f"--dtype {name!r}: use one of fp32, bf16, fp16")
    if device == "cpu" and dtypes[name] != torch.float32:
        raise SystemExit(f"--dtype {name} on CPU: CPU timings here are fp32 only (16-bit matmuls on CPU are "
                         f"emulated or unrepresentative); use --dtype fp32")
    return dtypes[name]


def autocast_ctx(device, dtype):
    """bf16/fp16 on CUDA through autocast (weights stay fp32, as in training); fp32 means no autocast."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


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


# ---- timing ---------------------------------------------------------------------------------------

def summarize(ms):
    """Median and spread of a list of times in ms."""
    ms = sorted(ms)
    q = statistics.quantiles(ms, n=4, method="inclusive") if len(ms) > 1 else [ms[0]] * 3
    return dict(median=statistics.median(ms), p25=q[0], p75=q[2], min=ms[0], max=ms[-1], n=len(ms))


class PhaseClock:
    """Marks points in one iteration; `elapsed()` returns ms between consecutive marks.

    CUDA: events recorded into the current stream, read after a synchronize. CPU: perf_counter.
    """

    def __init__(self, device):
        self.cuda = device.startswith("cuda")
        self.marks = []

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def elapsed(self):
        if self.cuda:
            torch.cuda.synchronize()
            ms = [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        else:
            ms = [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]
        self.marks = []
        return ms


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_train_step(model, optimizer, idx, targets, device, dtype, warmup, iters):
    """Forward (incl. loss), backward, optimizer step (+ zero_grad), each timed separately.

    Returns {"fwd": summary, "bwd": ..., "opt": ..., "step": summary of their per-iteration sum}.
    """
    clock, times = PhaseClock(device), {"fwd": [], "bwd": [], "opt": [], "step": []}
    for it in range(warmup + iters):
        sync(device)
        clock.mark()
        with autocast_ctx(device, dtype):
            _, loss = model(idx, targets)
        clock.mark()
        loss.backward()
        clock.mark()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark()
        fwd, bwd, opt = clock.elapsed()
        if it >= warmup:
            for k, v in zip(("fwd", "bwd", "opt", "step"), (fwd, bwd, opt, fwd + bwd + opt)):
                times[k].append(v)
    return {k: summarize(v) for k, v in times.items()}


def time_fn(fn, device, warmup, iters):
    """Summary (ms) of `fn()` alone, synchronised around each call."""
    clock, ms = PhaseClock(device), []
    for it in range(warmup + iters):
        sync(device)
        clock.mark()
        fn()
        clock.mark()
        (t,) = clock.elapsed()
        if it >= warmup:
            ms.append(t)
    return summarize(ms)


def time_fwd_bwd(fwd, device, warmup, iters, grad=None):
    """`fwd()` returns a tensor; times it and its .backward(grad) separately. -> (fwd summary, bwd summary).

    grad: the upstream gradient (same shape as the output), None for a scalar output.
    """
    clock, f_ms, b_ms = PhaseClock(device), [], []
    for it in range(warmup + iters):
        sync(device)
        clock.mark()
        out = fwd()
        clock.mark()
        out.backward(grad)
        clock.mark()
        f, b = clock.elapsed()
        if it >= warmup:
            f_ms.append(f)
            b_ms.append(b)
    return summarize(f_ms), summarize(b_ms)


# ---- FLOPs ----------------------------------------------------------------------------------------

def train_flops_per_token(model, seq_len):
    c = model.config
    return flops_per_token(model, seq_len, c.n_layer, c.n_embd)


def forward_flops_per_token(model, seq_len):
    """Inference: 2 per matmul parameter (trainable or not) plus attention's forward 4 * n_layer * C * T."""
    c = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if not name.endswith("wpe.weight"))
    return 2 * n + 4 * c.n_layer * c.n_embd * seq_len


def num_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- isolated runs and peak memory ----------------------------------------------------------------

def peak_memory_bytes(device):
    """CUDA: peak allocated by tensors since the last reset. CPU: this process's peak RSS."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def _child(fn, args, threads):
    torch.set_num_threads(threads)
    out = fn(*args)
    out["peak_mem"] = peak_memory_bytes(args[0]["device"]) if out.get("peak_mem") is None else out["peak_mem"]
    return out


def _idle(cfg):
    return {}


def run_isolated(fn, cfg, *args):
    """Run fn(cfg, *args) -> dict in a fresh spawned process; adds "peak_mem" (bytes) to its result.

    A fresh process per configuration means no allocator cache, compiled graph or page left over
    from the previous one can flatter or burden the next. cfg must hold "device" and "threads".
    """
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_child, (fn, (cfg, *args), cfg["threads"]))


def idle_baseline_bytes(cfg):
    """Peak RSS of a child that imported torch and did nothing (CPU); 0 on CUDA (allocated bytes)."""
    if cfg["device"].startswith("cuda"):
        return 0
    return run_isolated(_idle, cfg)["peak_mem"]


# ---- profiling ------------------------------------------------------------------------------------

def profile_table(fn, device, steps=3, row_limit=25):
    """torch.profiler key_averages of `steps` calls of fn(), sorted by self time (one warm-up call first)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)


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


def markdown_table(rows, columns):
    """rows: list of dicts; columns: list of (header, key, formatter or None)."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join((f or fmt)(r.get(k)) for _, k, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def environment(device, threads):
    env = dict(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), device=device_label(device), torch=torch.__version__,
               python=sys.version.split()[0])
    if hasattr(os, "getloadavg"):  # other processes on the machine make CPU timings noisy: record how busy it was
        env["load_avg_1_5_15min_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
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
    """Write <out_dir>/<device>_<name>.json and .md atomically; returns the two paths."""
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
