"""One LoRA layer, two ways to compute it: when does the fused path beat the split one?

    python bench/fused_vs_split.py            # GPT-2 shapes (CPU: a short sweep; --full for everything)
    python bench/fused_vs_split.py --shapes 4096x4096 --tokens 1024,4096 --ranks 16

For a layer W (out, in) with adapter A (r, in), B (out, r), scaling s, and N tokens x (N, in):

    plain   y = x W^T                        the frozen layer alone (what merged costs)
    split   y = x W^T + s (x A^T) B^T        lora/layer.py, mode="split": one big and two thin GEMMs
    fused   y = x (W + s B A)^T              mode="fused": form W' = W + sBA, then one big GEMM
    merged  y = x W'^T with W' precomputed   inference after merge_lora: exactly plain's cost

The FLOP model (multiply-add = 2 FLOPs), forward:
    split   2 N in out + 2 N r (in + out)        the thin GEMMs grow with N
    fused   2 N in out + 2 r in out              forming W' does not depend on N
so fused does fewer FLOPs once 2 N r (in + out) > 2 r in out, i.e. for
    N > N_flop = in out / (in + out)             (independent of r!)
GPT-2's c_attn 768 -> 2304: 576 tokens; 3072 -> 768: 614; LLaMA-7B 4096 -> 4096: 2048; 4096 -> 11008: 2985.

The byte model (fp32, e = 4 bytes per element moved through memory), forward, what each adds to plain, for
the code in lora/layer.py:
    split   x read again by x A^T (N in), the thin (N, r) written and read (2 N r), and base.addmm_(xA^T, B^T)
            reads and writes the (N, out) output once more (2 N out)      ->  e N (in + 2 r + 2 out)
    fused   torch.addmm(W, B, A, alpha=s) copies W into the new W' (read + write, 2 in out), then the GEMM with
            inner size r reads and writes W' again (2 in out)               ->  e 4 in out
so fused moves fewer bytes for N > N_byte = 4 in out / (in + 2 out) (r << in, out). 768 -> 2304: 1317 tokens;
3072 -> 768: 2048; 4096 -> 4096: 5461; 4096 -> 11008: 6906. The thin GEMMs are memory-bound (a GEMM with
inner size r does 2r FLOPs per element it writes), so the byte model is the better guide on a GPU; on a CPU,
with a much lower FLOP/byte ridge, the truth lies in between. Both say: fused wins from one or two thousand
tokens up for GPT-2's shapes; for LLaMA-7B's, the models disagree at 4096 tokens (fewer FLOPs, more bytes),
so expect a tie there and a fused win only beyond ~6k tokens.

Measurement. Split and fused are timed interleaved (split fwd, split bwd, fused fwd, fused bwd in every
iteration) and the ratios are medians of per-iteration ratios: on a shared machine a slow patch then hits both
alike instead of one of them.

Backward (training) is a different story: both need dx = dy W' (or dy W plus a thin correction) and the
thin dA, dB; fused recomputes W' and x A^T rather than saving them (see lora/layer.py). Timed here too.
"""
import argparse
import statistics
import sys


import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from bench import common, timing  # noqa: E402

ALL_SHAPES = "768x2304,768x3072,3072x768,4096x4096,4096x11008"  # GPT-2 c_attn, c_fc, mlp.c_proj; LLaMA-7B
ALL_TOKENS = "1,16,64,256,1024,4096,16384"
ALL_RANKS = "1,8,16,32,64,128"
CPU_SHAPES, CPU_TOKENS, CPU_RANKS = "768x2304,768x3072,3072x768", "16,256,1024,4096", "8,64"


def n_flop(fin, fout):
    return fin * fout / (fin + fout)


def n_byte(fin, fout):
    return 4 * fin * fout / (fin + 2 * fout)


def make_layer(fin, fout, r, mode, device, alpha=16.0):
    from lora import LoRALinear
    torch.manual_seed(0)
    base = nn.Linear(fin, fout, device=device)
    if mode == "plain":
        base.requires_grad_(False)
        return base
    layer = LoRALinear(base, r=r, alpha=alpha, mode="split" if mode == "merged" else mode)
    nn.init.normal_(layer.lora_B, std=0.02)  # as after some training; B = 0 would not change the timing anyway
    if mode == "merged":
        layer.merge()
    return layer


def fwd_bwd_phases(layer, x, dy, dtype):
    """[forward, backward] callables for one layer, for timing.time_phases."""
    state = {}

    def forward():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        with timing.autocast_ctx(x.device.type, dtype):
            state["out"] = layer(x)
    return [forward, lambda: state.pop("out").backward(dy)]


def time_layer(layer, x, dy, cfg, dtype):
    """(fwd, bwd) summaries of one layer on its own."""
    (f_ms, b_ms), info = timing.time_phases(fwd_bwd_phases(layer, x, dy, dtype), cfg["device"], cfg["warmup"],
                                            cfg["iters"])
    return dict(timing.summarize(f_ms), noise=info), timing.summarize(b_ms)


def time_merged(layer, x, cfg, dtype):
    """Summary of an inference forward (no_grad) of a merged layer."""
    def infer():
        with torch.no_grad(), timing.autocast_ctx(cfg["device"], dtype):
            layer(x)
    return timing.time_fn(infer, cfg["device"], cfg["warmup"], cfg["iters"])


def time_split_and_fused(split, fused, x, dy, cfg, dtype):
    """Both layers in every iteration; their summaries, and the medians of the per-iteration fused/split ratios."""
    phases = fwd_bwd_phases(split, x, dy, dtype) + fwd_bwd_phases(fused, x, dy, dtype)
    (sf, sb, ff, fb), info = timing.time_phases(phases, cfg["device"], cfg["warmup"], cfg["iters"])
    fwd_ratio = statistics.median(f / s for f, s in zip(ff, sf))
    bwd_ratio = statistics.median(f / s for f, s in zip(fb, sb))
    step_ratio = statistics.median((f1 + f2) / (s1 + s2) for f1, f2, s1, s2 in zip(ff, fb, sf, sb))
    summaries = [dict(timing.summarize(ms), noise=info) for ms in (sf, sb, ff, fb)]
    return summaries, fwd_ratio, bwd_ratio, step_ratio


def first_win(points):
    """points: [(tokens, fused/split ratio)] sorted; smallest tokens from which fused stays faster, or None."""
    win = None
    for tokens, ratio in reversed(points):
        if ratio < 1.0:
            win = tokens
        else:
            break
    return win


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p, model_args=False)
    p.add_argument("--shapes", default=None, help=f"in x out, comma separated (all: {ALL_SHAPES})")
    p.add_argument("--tokens", default=None, help=f"token counts N (all: {ALL_TOKENS})")
    p.add_argument("--ranks", default=None, help=f"LoRA ranks (all: {ALL_RANKS})")
    p.add_argument("--full", action="store_true", help="every shape, token count and rank (the CUDA default)")
    p.add_argument("--name", default="fused_vs_split")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    command = " ".join(["python", "bench/fused_vs_split.py", *argv])
    cfg = common.resolve_args(args)
    cuda = cfg["device"].startswith("cuda")
    big = cuda or cfg["full"]
    try:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in (cfg["shapes"] or (ALL_SHAPES if big else
                                                                                          CPU_SHAPES)).split(",")]
        tokens = [int(t) for t in (cfg["tokens"] or (ALL_TOKENS if big else CPU_TOKENS)).split(",")]
        ranks = [int(r) for r in (cfg["ranks"] or (ALL_RANKS if big else CPU_RANKS)).split(",")]
        assert all(len(s) == 2 for s in shapes) and min(tokens) > 0 and min(ranks) > 0
    except (ValueError, AssertionError):
        raise SystemExit("--shapes like 768x2304,4096x4096; --tokens and --ranks positive integers, comma separated")
    dtype = common.parse_dtype(cfg["dtype"], cfg["device"])
    print(f"device {common.device_label(cfg['device'])}, dtype {cfg['dtype']}, threads {cfg['threads']}, "
          f"warmup {cfg['warmup']}, iters {cfg['iters']}; shapes {shapes}, tokens {tokens}, ranks {ranks}")

    rows, summary = [], []
    for fin, fout in shapes:
        per_rank = {r: [] for r in ranks}
        for n in sorted(tokens):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, fin, generator=g).to(cfg["device"]).requires_grad_(True)  # (N, in)
            dy = torch.randn(n, fout, generator=g).to(cfg["device"])  # (N, out), upstream gradient
            if dtype != torch.float32:
                dy = dy.to(dtype)
            plain_f, plain_b = time_layer(make_layer(fin, fout, 1, "plain", cfg["device"]), x, dy, cfg, dtype)
            merged_f = time_merged(make_layer(fin, fout, ranks[0], "merged", cfg["device"]), x, cfg, dtype)
            for r in ranks:
                split, fused = (make_layer(fin, fout, r, mode, cfg["device"]) for mode in ("split", "fused"))
                (split_f, split_b, fused_f, fused_b), fwd_ratio, bwd_ratio, step_ratio = time_split_and_fused(
                    split, fused, x, dy, cfg, dtype)
                row = dict(shape=f"{fin}x{fout}", tokens=n, r=r, plain_fwd=plain_f, plain_bwd=plain_b,
                           split_fwd=split_f, split_bwd=split_b, fused_fwd=fused_f, fused_bwd=fused_b,
                           merged_fwd=merged_f, fwd_ratio=fwd_ratio, bwd_ratio=bwd_ratio)
                row["discarded"] = sum(t["noise"]["discarded"] for t in (plain_f, merged_f, split_f))
                row["noisy"] = any(t["noise"]["noisy"] for t in (plain_f, merged_f, split_f))
                rows.append(row)
                per_rank[r].append((n, fwd_ratio, bwd_ratio, step_ratio))
                print(f"{fin}x{fout} N={n:>6} r={r:>3}: fwd plain {plain_f['median']:8.2f} split "
                      f"{split_f['median']:8.2f} fused {fused_f['median']:8.2f} merged {merged_f['median']:8.2f} | "
                      f"bwd plain {plain_b['median']:8.2f} split {split_b['median']:8.2f} fused "
                      f"{fused_b['median']:8.2f} ms", flush=True)
        for r, pts in per_rank.items():
            summary.append(dict(shape=f"{fin}x{fout}", r=r, n_flop=n_flop(fin, fout), n_byte=n_byte(fin, fout),
                                fwd_from=first_win([(n, f) for n, f, _, _ in pts]),
                                bwd_from=first_win([(n, b) for n, _, b, _ in pts]),
                                step_from=first_win([(n, st) for n, _, _, st in pts])))

    ms = lambda t: f"{t['median']:.2f}"  # noqa: E731
    ratio = lambda x: f"{x:.2f}"  # noqa: E731
    md = common.markdown_table(rows, [
        ("shape", "shape", None), ("tokens", "tokens", None), ("r", "r", None),
        ("plain fwd", "plain_fwd", ms), ("split fwd", "split_fwd", ms), ("fused fwd", "fused_fwd", ms),
        ("merged fwd (no_grad)", "merged_fwd", ms), ("plain bwd", "plain_bwd", ms),
        ("split bwd", "split_bwd", ms), ("fused bwd", "fused_bwd", ms),
        ("fused/split fwd", "fwd_ratio", ratio), ("fused/split bwd", "bwd_ratio", ratio)])
    tok = lambda x: "never" if x is None else f"{x:,}"  # noqa: E731
    md2 = common.markdown_table(summary, [
        ("shape", "shape", None), ("r", "r", None), ("model N_flop", "n_flop", lambda x: f"{x:,.0f}"),
        ("model N_byte", "n_byte", lambda x: f"{x:,.0f}"), ("fused fwd wins from N", "fwd_from", tok),
        ("fused bwd wins from N", "bwd_from", tok), ("fused fwd+bwd wins from N", "step_from", tok)])
    busy = (f"{sum(r['discarded'] for r in rows)} iterations re-run because other processes used the CPU"
            + (f"; NOISY (never quiet): {sum(r['noisy'] for r in rows)} rows" if any(r["noisy"] for r in rows) else ""))
    md = (f"Times in ms (median of >= {cfg['iters']} iterations); ratios: median of per-iteration fused/split, "
          f"the two timed interleaved; < 1: fused faster. {busy}.\n\n{md}\n\n"
          f"Where fused starts to win (smallest N in the sweep from which it stays faster) vs the model:\n\n"
          f"{md2}")
    print()
    print(md)
    env = common.environment(cfg["device"], cfg["threads"])
    print("wrote", *common.save_results(cfg["out_dir"], cfg["name"], env, cfg, rows, md, dict(summary=summary),
                                        command=command))
    return rows, summary


if __name__ == "__main__":
    main()
