"""Does keeping several named adapters on a model slow down the one that runs?

    python bench/named_adapters.py            # GPT-2 124M shapes, LoRA r=8 on every block Linear

Three models with the same weights and the same active adapter, timed interleaved (one training step of each
per round, fwd + bwd; the ratio is the median of per-round ratios, so a busy patch of a shared machine hits all
three alike):
    before  the LoRALinear forward from before DoRA and named adapters existed (git show BEFORE:lora/layer.py)
    single  today's LoRALinear, one adapter
    named   today's, with two more adapters loaded beside it (parked, lora/named.py)
lora/named.py swaps whole layers in and out, so "named" runs the very code "single" runs; and "single" differs
from "before" by one attribute test (is this a DoRA layer?). Also timed: set_adapter, the cost of a switch.
"""
import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time


import torch  # noqa: E402

from bench import common  # noqa: E402

BEFORE = "cb86180"  # the commit before lora/dora.py and lora/named.py


def before_class():
    """The LoRALinear class of commit BEFORE, loaded from its source."""
    source = subprocess.run(["git", "show", f"{BEFORE}:lora/layer.py"], cwd=common.ROOT, capture_output=True,
                            text=True, check=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("lora_layer_before", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module.LoRALinear


def build(cfg, kind):
    from lora import LoRAConfig, add_adapter, apply_lora, lora_layers
    torch.manual_seed(0)
    model = common.make_gpt(cfg)
    config = LoRAConfig(r=cfg["r"], alpha=16.0, targets=cfg["targets"])
    apply_lora(model, config)
    if kind == "before":
        cls = before_class()
        for _, layer in lora_layers(model):
            layer.__class__ = cls  # same tensors, the old forward
    elif kind == "named":
        add_adapter(model, "second", config)
        add_adapter(model, "third", config)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--name", default="named_adapters")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    cfg = common.resolve_args(args)
    cfg["r"], cfg["rounds"] = args.r, args.rounds
    idx, targets = common.random_batch(cfg)
    kinds = ("before", "single", "named")
    models = {k: build(cfg, k) for k in kinds}
    times = {k: [] for k in kinds}

    def step(model):
        t0 = time.perf_counter()
        _, loss = model(idx, targets)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) * 1e3

    for k in kinds:  # warmup
        step(models[k])
    for _ in range(cfg["rounds"]):
        for k in kinds:
            times[k].append(step(models[k]))
    from lora import lora_layers, set_adapter
    switch = []
    for _ in range(10):
        t0 = time.perf_counter()
        set_adapter(models["named"], "second")
        set_adapter(models["named"], "default")
        switch.append((time.perf_counter() - t0) * 1e3 / 2)
    rows = []
    for k in kinds:
        ratio = statistics.median(a / b for a, b in zip(times[k], times["before"]))
        rows.append(dict(name=k, step_ms=statistics.median(times[k]), min_ms=min(times[k]), vs_before=ratio))
    md = common.markdown_table(rows, [("model", "name", None), ("fwd+bwd ms (median)", "step_ms", common.fmt),
                                      ("min ms", "min_ms", common.fmt),
                                      ("/ before (median of per-round ratios)", "vs_before",
                                       lambda x: f"{x:.3f}")])
    md = (f"GPT n_layer={cfg['n_layer']} n_embd={cfg['n_embd']}, B={cfg['B']} T={cfg['T']}, LoRA r={cfg['r']} on "
          f"{','.join(cfg['targets'])}; {cfg['rounds']} interleaved rounds.\n\n{md}\n\nset_adapter (one switch, "
          f"{len(lora_layers(models['named']))} layers): "
          f"median {statistics.median(switch):.2f} ms\n")
    print(md)
    env = common.environment(cfg["device"], cfg["threads"])
    paths = common.save_results(cfg["out_dir"], cfg["name"], env, cfg, rows + [dict(name="set_adapter_ms",
                                switch_ms=statistics.median(switch))], md,
                                command=" ".join(["python", "bench/named_adapters.py", *argv]))
    print("wrote", *paths)
    return rows


if __name__ == "__main__":
    main()
