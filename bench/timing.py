"""The timing and memory harness shared by the bench/ scripts.

Timing. A GPU runs asynchronously: the Python call returns as soon as the kernel is queued, so a wall
clock around it measures nothing. On CUDA we record events into the stream between the phases
(forward | backward | optimizer step) and synchronise once per iteration; on CPU every op is
synchronous and time.perf_counter between phases is exact. The first iterations pay for allocator
growth, kernel autotuning and torch.compile, so `warmup` iterations are run and thrown away.
We report the median (robust to a stray slow iteration) and the spread: quartiles and min/max.

Memory. On CUDA, torch.cuda.max_memory_allocated is the peak of live tensors. On CPU there is no such
counter, so each configuration runs in a fresh process (multiprocessing "spawn") and reports that
process's peak resident set size (VmHWM: tools/resident.py). An idle child that only imported torch gives
the baseline to subtract: what is left is what the configuration itself needed.

FLOPs. Achieved FLOP/s = FLOPs per token (training/flops.py: 6 per trainable and 4 per frozen matmul
parameter, plus attention) x tokens/s. MFU divides that by the device's dense bf16 peak; it is only
reported on CUDA with a 16-bit dtype and a GPU in training/flops.py's table.
"""
import multiprocessing as mp
import os
import statistics
import time
from contextlib import nullcontext

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from training.flops import flops_per_token, peak_for_name  # noqa: E402
from training.memory import peak_memory_bytes  # noqa: E402

# ---- device and precision ---------------------------------------------------------------------------------------

def peak_flops(device, dtype):
    """The device's dense bf16 peak in FLOP/s, or None (CPU, fp32, or a GPU not in the table)."""
    if not device.startswith("cuda") or dtype not in (torch.bfloat16, torch.float16):
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def autocast_ctx(device, dtype):
    """bf16/fp16 on CUDA through autocast (weights stay fp32, as in training); fp32 means no autocast."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


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


class OtherLoad:
    """How much of the machine other processes used during an interval (CPU, Linux; else always 0).

    CPU timings on a shared machine are fragile: with every core busy, a neighbour's process makes
    each parallel op wait for a descheduled thread, and a step takes 2-10x longer. /proc/stat counts the
    whole machine's busy CPU time (including time stolen by the hypervisor), time.process_time our own;
    the difference is everyone else. Granularity is a clock tick (10 ms), so only intervals of a few
    hundred ms or more are judged.
    """

    def __init__(self, device):
        self.on = not device.startswith("cuda") and os.path.exists("/proc/stat")
        self.tick = os.sysconf("SC_CLK_TCK") if self.on else 100
        self.ncpu = os.cpu_count() or 1

    def _busy_s(self):
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return (sum(v) - v[3] - v[4]) / self.tick

    def start(self):
        if self.on:
            self.t0 = (self._busy_s(), time.process_time(), time.perf_counter())

    def fraction(self):
        """Others' CPU time / (wall time x cores) since start()."""
        if not self.on:
            return 0.0
        busy, own = self._busy_s() - self.t0[0], time.process_time() - self.t0[1]
        return max(0.0, busy - own) / ((time.perf_counter() - self.t0[2]) * self.ncpu)


NOISE_LIMIT = 0.05  # an interval in which others used more than 5% of the machine is thrown away
CHUNK_S = 0.3  # judge the noise over at least this much wall time


def time_phases(phases, device, warmup, iters):
    """Run the callables `phases` in order as one iteration; ms of each phase, per clean iteration.

    `warmup` iterations first, untimed. Then iterations are grouped into chunks of >= CHUNK_S seconds;
    on CPU a chunk during which other processes used more than NOISE_LIMIT of the machine is thrown
    away and run again (at most 3 * iters + 5 chunks in all), so a neighbour's burst does not end up
    in the medians. Returns (list of per-phase ms lists, info) with info = {"discarded": iterations
    thrown away, "others": the worst load kept, "noisy": True if no clean chunk was found at all}.
    """
    clock, load = PhaseClock(device), OtherLoad(device)
    for _ in range(warmup):
        for phase in phases:
            phase()
    sync(device)
    kept, noisy_kept, discarded, worst = [], [], 0, 0.0
    for _ in range(3 * iters + 5):
        chunk, t0 = [], time.perf_counter()
        load.start()
        while time.perf_counter() - t0 < CHUNK_S or not chunk:
            sync(device)
            clock.mark()
            for phase in phases:
                phase()
                clock.mark()
            chunk.append(clock.elapsed())
        others = load.fraction()
        if others > NOISE_LIMIT:
            discarded += len(chunk)
            noisy_kept += chunk
        else:
            kept += chunk
            worst = max(worst, others)
        if len(kept) >= iters:
            break
    noisy = not kept
    if noisy:  # the machine was never quiet: report what we have, flagged
        kept = noisy_kept
    return [list(col) for col in zip(*kept)], dict(discarded=discarded, others=worst, noisy=noisy)


def time_train_step(model, optimizer, idx, targets, device, dtype, warmup, iters):
    """Forward (incl. loss), backward, optimizer step (+ zero_grad), each timed separately.

    Returns {"fwd": summary, "bwd": ..., "opt": ..., "step": summary of their per-iteration sum, "noise": info}.
    """
    state = {}

    def forward():
        with autocast_ctx(device, dtype):
            state["loss"] = model(idx, targets)[1]

    def step():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    (fwd, bwd, opt), info = time_phases([forward, lambda: state.pop("loss").backward(), step], device, warmup, iters)
    total = [f + b + o for f, b, o in zip(fwd, bwd, opt)]
    return dict(fwd=summarize(fwd), bwd=summarize(bwd), opt=summarize(opt), step=summarize(total), noise=info)


def time_fn(fn, device, warmup, iters):
    """Summary (ms) of `fn()` alone."""
    (ms,), info = time_phases([fn], device, warmup, iters)
    return dict(summarize(ms), noise=info)


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
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)
