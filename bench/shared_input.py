"""LoRA layers that read the same input, grouped (lora/grouped.py) or not: what does one down-projection GEMM buy?

    python bench/shared_input.py                      # SmolLM2-135M's shapes, r=16, B=2, T=256, fp32 (CPU)
    python bench/shared_input.py --what layers --repeats 15
    python bench/shared_input.py --n_layer 8          # a shorter model, for a busy machine

Grouping changes no FLOP count. What it changes, per group of k layers reading the same N tokens x (N, in) (a LLaMA
block has two: q/k/v, k = 3, and gate/up, k = 2):
    forward    k GEMMs x A_i^T (N, in) @ (in, r)          -> 1: x A_cat^T (N, in) @ (in, k r)
    backward   k GEMMs (dy_i B_i)^T x for dA_i            -> 1: G^T x
               k GEMMs (dy_i B_i) A_i for dx, 2k adds of (N, in) gradients into dx   -> 1 GEMM, k in-place addmm
and costs one torch.cat of the A's in forward and one in backward (k r x in numbers). A thin GEMM is memory-bound
(it reads all of x, (N, in), to write N r numbers): grouping reads x once instead of k times, and the autograd
graph has fewer nodes. The base GEMMs (the FLOPs) are untouched, so the gain is bounded by the thin GEMMs' share.

Three measurements, grouping off vs on, each pair run back to back in alternating order (off-on, on-off, ...),
so that a drift or a neighbour's burst hits both; the ratio on/off is taken per pair and its median reported:
    qkv / gate_up   those layers alone, forward + backward of (B T, in) tokens (x requires grad, as mid-model)
    step            the whole LoRA training step of a LLaMA of SmolLM2-135M's shapes (random weights; timing does
                    not depend on their values): forward with the loss, backward; LoRA on all seven projections,
                    of which the model groups q/k/v (gate/up run on their own: grouping them measured no faster).
                    The optimizer step is the same either way and left out.
    cat             torch.cat of q/k/v's A's, what grouping pays twice per call.
The load average (the machine is shared) is recorded before and after, and per pair the share of the machine's CPU
time that other processes used (bench/timing.py's OtherLoad); pairs with more than QUIET of it are run again.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

from bench import common, timing

SMOLLM2 = "models/smollm2-135m-instruct"
SMOLLM2_SHAPES = dict(vocab_size=49152, n_embd=576, intermediate_size=1536, n_layer=30, n_head=9, n_kv_head=3,
                      head_dim=64, tie_word_embeddings=True)  # used when the folder is missing
# wall: what a run takes. cpu: this process's CPU time, all its threads; with --threads 1 it counts the work done
# and not the time spent descheduled, which on a loaded machine is most of the noise (with 2 threads it also counts
# one thread spinning while it waits for the other)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_config(cfg):
    from model.hf import read_json
    from model.llama import LLaMAConfig, config_from_hf
    path = os.path.join(common.ROOT, SMOLLM2, "config.json")
    shapes = config_from_hf(read_json(path)) if os.path.exists(path) else dict(SMOLLM2_SHAPES)
    shapes["n_layer"] = cfg["n_layer"] or shapes["n_layer"]
    shapes["max_seq_len"] = max(cfg["T"], shapes.get("max_seq_len", 2048))
    return LLaMAConfig(**shapes)


def lora_model(cfg):
    from lora import LoRAConfig, apply_lora, lora_layers
    from model import LLaMA
    torch.manual_seed(0)
    model = LLaMA(llama_config(cfg))
    apply_lora(model, LoRAConfig(r=cfg["r"], alpha=2.0 * cfg["r"], targets=SEVEN))
    with torch.no_grad():  # as after some training; B = 0 would not change the timing anyway
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0.0, 0.02)
    return model.train()


QUIET = 0.10  # a pair during which other processes used more than this share of the machine is run again


def paired(run, setting, repeats, warmup, load, clock=time.perf_counter):
    """run() timed with setting(False) and setting(True), pair by pair, alternating which goes first.

    As bench/timing.py's time_phases: a pair during which others used more than QUIET of the machine counts as
    noisy, and pairs are run until `repeats` quiet ones exist (at most 3 * repeats + 5 in all).
    Returns [(off ms, on ms, others' share)] for every pair run."""
    for _ in range(warmup):
        for on in (False, True):
            setting(on)
            run()
    pairs = []
    for i in range(3 * repeats + 5):
        load.start()
        times = {}
        for on in ((False, True) if i % 2 == 0 else (True, False)):
            setting(on)
            t0 = clock()
            run()
            times[on] = (clock() - t0) * 1e3
        pairs.append((times[False], times[True], load.fraction()))
        if sum(others <= QUIET for _, _, others in pairs) >= repeats:
            break
    return pairs


def row(what, pairs, calls=1):
    """A result row from the quiet pairs (all of them, flagged noisy, if none was quiet): medians in ms per call,
    the median paired ratio grouped/off and its quartiles; the all-pairs ratio next to it."""
    quiet = [p for p in pairs if p[2] <= QUIET]
    kept = quiet or pairs
    ratios = sorted(on / off for off, on, _ in kept)
    q = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else [ratios[0]] * 3
    return dict(what=what, off_ms=statistics.median(p[0] for p in kept) / calls,
                on_ms=statistics.median(p[1] for p in kept) / calls, ratio=statistics.median(ratios),
                ratio_p25=q[0], ratio_p75=q[2], pairs=len(kept), faster_pairs=sum(r < 1 for r in ratios),
                noisy=not quiet, all_pairs=len(pairs), ratio_all=statistics.median(on / off for off, on, _ in pairs),
                others=statistics.median(p[2] for p in pairs))


def layer_group(cfg, outs):
    """LoRALinear layers C -> each of `outs` (rank r), an input x (B, T, C) and an upstream gradient per output."""
    from lora import LoRALinear
    from model.modules import project
    torch.manual_seed(0)
    C = cfg["n_embd"]
    layers = []
    for out in outs:
        layer = LoRALinear(nn.Linear(C, out, bias=False), r=cfg["r"], alpha=2.0 * cfg["r"])
        nn.init.normal_(layer.lora_B, std=0.02)
        layers.append(layer)
    x = torch.randn(cfg["B"], cfg["T"], C, requires_grad=True)
    dys = [torch.randn(cfg["B"], cfg["T"], out) for out in outs]

    def run():
        for _ in range(cfg["calls"]):
            x.grad = None
            for layer in layers:
                layer.lora_A.grad = layer.lora_B.grad = None
            torch.autograd.backward(project(x, layers), dys)

    return layers, run


def bench_layers(cfg, load):
    from lora import set_lora_grouping
    c = llama_config(cfg)
    rows = []
    groups = dict(qkv=(c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim),
                  gate_up=(c.intermediate_size, c.intermediate_size))
    cfg = dict(cfg, n_embd=c.n_embd)
    for name, outs in groups.items():
        layers, run = layer_group(cfg, outs)
        model = nn.ModuleList(layers)
        pairs = paired(run, lambda on, model=model: set_lora_grouping(model, on), cfg["layer_repeats"], 1, load,
                       CLOCKS[cfg["clock"]])
        rows.append(row(f"{name} layers ({c.n_embd} -> {', '.join(map(str, outs))}), fwd+bwd", pairs, cfg["calls"]))
        print(f"{rows[-1]['what']}: off {rows[-1]['off_ms']:.2f} ms, on {rows[-1]['on_ms']:.2f} ms, "
              f"on/off {rows[-1]['ratio']:.3f}", flush=True)
        if name == "qkv":  # what grouping pays per call: two of these (forward and backward)
            As = [layer.lora_A.detach() for layer in layers]
            n = 200
            t0 = time.perf_counter()
            for _ in range(n):
                torch.cat(As)
            cat_ms = (time.perf_counter() - t0) * 1e3 / n
            rows.append(dict(what=f"torch.cat of q/k/v's A ({sum(a.shape[0] for a in As)} x {c.n_embd}): "
                                  f"{cat_ms * 1e3:.1f} us, twice per call", cat_us=cat_ms * 1e3, pairs=n))
            print(f"cat: {cat_ms * 1e3:.1f} us", flush=True)
    return rows


def bench_step(cfg, load):
    from lora import set_lora_grouping
    model = lora_model(cfg)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, model.config.vocab_size, (cfg["B"], cfg["T"] + 1), generator=g)

    def run():
        for p in model.parameters():
            p.grad = None
        model(idx[:, :-1], idx[:, 1:])[1].backward()

    pairs = paired(run, lambda on: set_lora_grouping(model, on), cfg["repeats"], 1, load, CLOCKS[cfg["clock"]])
    c = model.config
    r = row(f"LoRA training step, fwd+bwd ({c.n_layer} layers)", pairs)
    print(f"{r['what']}: off {r['off_ms']:.0f} ms, on {r['on_ms']:.0f} ms, on/off {r['ratio']:.3f}", flush=True)
    return [r]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p, model_args=False)
    p.add_argument("--what", default="layers,step", help="layers, step, or both (comma separated)")
    p.add_argument("--n_layer", type=int, default=None, help="blocks in the step's model (default: SmolLM2's 30)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--B", type=int, default=2)
    p.add_argument("--T", type=int, default=256)
    p.add_argument("--repeats", type=int, default=6, help="step: pairs of (off, on) steps")
    p.add_argument("--layer_repeats", type=int, default=30, help="layers: pairs of (off, on) samples")
    p.add_argument("--calls", type=int, default=5, help="layers: fwd+bwd calls per timed sample")
    p.add_argument("--clock", default="wall", choices=sorted(CLOCKS), help="wall time, or this process's CPU time")
    p.add_argument("--name", default="shared_input")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    command = " ".join(["python", "bench/shared_input.py", *argv])
    cfg = common.resolve_args(args)
    if cfg["device"] != "cpu" or cfg["dtype"] != "fp32":
        raise SystemExit("bench/shared_input.py times fp32 on CPU only (the layers run eagerly, no autocast here)")
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"threads {cfg['threads']}, {cfg['clock']} clock, r {cfg['r']}, B {cfg['B']}, T {cfg['T']}; "
          f"load average {load_before}")
    load = timing.OtherLoad(cfg["device"])
    rows = []
    what = {w.strip() for w in cfg["what"].split(",")}
    if "layers" in what:
        rows += bench_layers(cfg, load)
    if "step" in what:
        rows += bench_step(cfg, load)
    ms = lambda x: "-" if x is None else f"{x:,.2f}"  # noqa: E731
    ratio = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    md = common.markdown_table(rows, [
        ("what", "what", None), ("off (ms)", "off_ms", ms), ("grouped (ms)", "on_ms", ms),
        ("grouped/off, median of pairs", "ratio", ratio), ("p25", "ratio_p25", ratio), ("p75", "ratio_p75", ratio),
        ("pairs", "pairs", None), ("pairs faster grouped", "faster_pairs", None),
        ("NOISY (no quiet pair)", "noisy", lambda x: "-" if x is None else "NOISY" if x else "no"),
        ("all pairs run", "all_pairs", None), ("ratio over all pairs", "ratio_all", ratio),
        ("others' CPU share, median of all", "others", lambda x: "-" if x is None else f"{x:.0%}")])
    md = (f"fp32, {cfg['threads']} threads, {cfg['clock']} clock, r={cfg['r']}, B={cfg['B']}, T={cfg['T']}. Off and "
          f"grouped timed in pairs, back to back in alternating order; ms are medians, the ratio the median of "
          f"per-pair ratios (< 1: grouping faster), over the quiet pairs (others used <= {QUIET:.0%} of the machine; "
          f"pairs are re-run until enough are quiet, at most 3 n + 5). Load average before the run: {load_before}."
          f"\n\n{md}")
    print()
    print(md)
    env = common.environment(cfg["device"], cfg["threads"])
    env["load average before, 1/5/15 min"] = load_before
    print("wrote", *common.save_results(cfg["out_dir"], cfg["name"], env, cfg, rows, md, command=command))
    return rows


if __name__ == "__main__":
    main()
