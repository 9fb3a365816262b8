"""Our GPT-2 and LoRA against transformers' GPT2LMHeadModel and PEFT's LoRA: same shapes, same step.

    python bench/vs_peft.py                  # GPT-2 124M; CPU: B=2, T=128, fp32; CUDA: B=16, T=1024, bf16
    python bench/vs_peft.py --r 32 --profile peft-lora

Four training steps (forward with loss, backward, AdamW step), all in one process:
    ours-lora   model.GPT + lora.apply_lora          (targets, r, alpha as given; dropout 0)
    peft-lora   GPT2LMHeadModel + peft.get_peft_model (the same targets, r, alpha; dropout 0)
    ours-full   model.GPT, every parameter trained
    hf-full     GPT2LMHeadModel, every parameter trained
They are timed interleaved, round-robin: one step of each, then the next round. A drift in clock speed
or a noisy neighbour then hits all four alike, and each round gives a paired ratio (ours / theirs) whose
median is robust to the rounds that were disturbed. Transformers runs with attn_implementation="sdpa",
the same fused attention kernel as ours; the optimizer is the same AdamW (foreach on CPU, fused on CUDA)
with the same parameter groups for all four. Skips with a message when transformers or peft is missing.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench import timing  # noqa: E402

NAMES = ("ours-lora", "peft-lora", "ours-full", "hf-full")


def adamw(model, device):
    """AdamW over the trainable parameters: decay on matrices, none on vectors (as GPT.configure_optimizers)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    extra = dict(fused=True) if device.startswith("cuda") else {}
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), **extra)


def hf_gpt2(cfg):
    import transformers
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=cfg["vocab_size"], n_positions=max(cfg["T"], 1024),
                                     n_embd=cfg["n_embd"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
                                     bos_token_id=cfg["vocab_size"] - 1, eos_token_id=cfg["vocab_size"] - 1)
    model = transformers.GPT2LMHeadModel(config).to(cfg["device"])
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"transformers chose attention {model.config._attn_implementation!r}, not 'sdpa'")
    return model


def build(cfg, name):
    """(step inputs -> loss function, model) for one of NAMES."""
    if name.startswith("ours"):
        model = timing.make_gpt(cfg)
        if name == "ours-lora":
            from lora import LoRAConfig, apply_lora
            apply_lora(model, LoRAConfig(r=cfg["r"], alpha=cfg["alpha"], dropout=0.0, targets=cfg["targets"],
                                         mode=cfg["mode"]))
        run = torch.compile(model) if cfg["compile"] else model
        return (lambda idx, targets: run(idx, targets)[1]), model
    model = hf_gpt2(cfg)
    if name == "peft-lora":
        import peft
        lcfg = peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=0.0,
                               target_modules=list(cfg["targets"]), fan_in_fan_out=True, bias="none")
        model = peft.get_peft_model(model, lcfg)
    run = torch.compile(model) if cfg["compile"] else model
    # transformers shifts the labels itself: labels = the inputs, so every position but the last has a target
    return (lambda idx, targets: run(input_ids=idx, labels=idx).loss), model


def paired(a, b):
    """Median over rounds of a[i] / b[i]: the ratio with the per-round drift cancelled."""
    return statistics.median(x / y for x, y in zip(a, b))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    timing.add_common_args(p)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--mode", default="split", choices=("split", "fused"), help="our LoRA's compute path")
    p.add_argument("--profile", default=None, choices=NAMES, help="print a torch.profiler table for one of them")
    p.add_argument("--name", default="vs_peft")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    command = " ".join(["python", "bench/vs_peft.py", *argv])
    if args.iters is None and args.device in ("auto", "cpu") and not torch.cuda.is_available():
        args.iters = 10  # 4 configurations a round; more rounds make the paired ratios steadier
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"skipping: {e.name} is not installed (pip install transformers peft to compare against them)")
        return None
    cfg = timing.resolve_args(args)
    device, dtype = cfg["device"], timing.parse_dtype(cfg["dtype"], cfg["device"])
    print(f"device {timing.device_label(device)}, dtype {cfg['dtype']}, compile {cfg['compile']}, threads "
          f"{cfg['threads']}; GPT n_layer={cfg['n_layer']} n_head={cfg['n_head']} n_embd={cfg['n_embd']} "
          f"vocab={cfg['vocab_size']}, B={cfg['B']} T={cfg['T']}; LoRA r={cfg['r']} alpha={cfg['alpha']} "
          f"targets {','.join(cfg['targets'])} (ours: {cfg['mode']}); warmup {cfg['warmup']}, iters {cfg['iters']}")
    idx, targets = timing.random_batch(cfg)
    names = [cfg["profile"]] if cfg["profile"] else NAMES
    runs = {}
    for name in names:
        loss_fn, model = build(cfg, name)
        runs[name] = (loss_fn, model, adamw(model, device))
    trainable = {n: timing.num_trainable(m) for n, (_, m, _) in runs.items()}
    print("trainable parameters:", ", ".join(f"{n} {t:,}" for n, t in trainable.items()))

    def step(name):
        loss_fn, _, opt = runs[name]
        with timing.autocast_ctx(device, dtype):
            loss = loss_fn(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if cfg["profile"]:
        for _ in range(cfg["warmup"]):
            step(cfg["profile"])
        print(f"profile of {cfg['profile']} ({cfg['iters']} steps, sorted by self time)")
        print(timing.profile_table(lambda: step(cfg["profile"]), device, steps=cfg["iters"]))
        return None

    clock = timing.PhaseClock(device)
    times = {n: {"fwd": [], "bwd": [], "opt": [], "step": []} for n in names}
    for it in range(cfg["warmup"] + cfg["iters"]):
        for name in names:  # round-robin: A, B, C, D, A, B, C, D, ...
            loss_fn, _, opt = runs[name]
            timing.sync(device)
            clock.mark()
            with timing.autocast_ctx(device, dtype):
                loss = loss_fn(idx, targets)
            clock.mark()
            loss.backward()
            clock.mark()
            opt.step()
            opt.zero_grad(set_to_none=True)
            clock.mark()
            fwd, bwd, o = clock.elapsed()
            if it >= cfg["warmup"]:
                for k, v in zip(("fwd", "bwd", "opt", "step"), (fwd, bwd, o, fwd + bwd + o)):
                    times[name][k].append(v)

    tokens = cfg["B"] * cfg["T"]
    rows = []
    for name in names:
        s = {k: timing.summarize(v) for k, v in times[name].items()}
        rows.append(dict(name=name, trainable=trainable[name], **s, step_ms=s["step"]["median"],
                         step_min=s["step"]["min"], tok_s=tokens / s["step"]["median"] * 1e3))
    st = {n: times[n]["step"] for n in names}
    fb = {n: [f + b for f, b in zip(times[n]["fwd"], times[n]["bwd"])] for n in names}
    ratios = [  # (what, paired ratio, target or None)
        ("ours-lora / peft-lora", paired(st["ours-lora"], st["peft-lora"]), 0.80),
        ("ours-full / hf-full", paired(st["ours-full"], st["hf-full"]), 0.90),
        ("ours-lora / ours-full", paired(st["ours-lora"], st["ours-full"]), 0.70),
        ("peft-lora / hf-full", paired(st["peft-lora"], st["hf-full"]), None),
        ("ours-lora / ours-full, fwd+bwd only", paired(fb["ours-lora"], fb["ours-full"]), None),
    ]
    iq = lambda t: f"{t['median']:.1f} ({t['p25']:.1f}-{t['p75']:.1f})"  # noqa: E731
    md = timing.markdown_table(rows, [
        ("step", "name", None), ("fwd ms", "fwd", iq), ("bwd ms", "bwd", iq), ("opt ms", "opt", iq),
        ("step ms", "step", iq), ("min step ms", "step_min", lambda x: f"{x:.1f}"), ("trainable", "trainable", None),
        ("tok/s", "tok_s", lambda x: f"{x:,.0f}")])
    verdict = lambda v, t: "" if t is None else f" (target <= {t:.2f}: {'MET' if v <= t else 'MISSED'})"  # noqa
    md += "\n\nPaired ratios of step time (median over the interleaved rounds):\n\n" + "\n".join(
        f"- {what}: {v:.3f}{verdict(v, t)}" for what, v, t in ratios)
    print()
    print(md)
    env = timing.environment(device, cfg["threads"])
    env["transformers"], env["peft"] = transformers.__version__, peft.__version__
    print("wrote", *timing.save_results(cfg["out_dir"], cfg["name"], env, cfg, rows, md,
                                        dict(ratios={w: v for w, v, _ in ratios}), command=command))
    return rows, ratios


if __name__ == "__main__":
    main()
