"""Our GPT-2 and LoRA against transformers' GPT2LMHeadModel and PEFT's LoRA: same shapes, same step.

    python bench/vs_peft.py                  # GPT-2 124M; CPU: B=2, T=128, fp32; CUDA: B=16, T=1024, bf16
    python bench/vs_peft.py --r 32 --profile peft-lora
    python bench/vs_peft.py --model models/smollm2-135m-instruct   # a real LLaMA folder (make smollm2)

Six training steps (forward with loss, backward, AdamW step), all in one process:
    ours-lora        model.GPT + lora.apply_lora          (targets, r, alpha as given; dropout 0), our defaults:
                     the chunked loss, its gradients formed in forward (model/chunked_loss.py)
    ours-lora-plain  the same on transformers' loss path: loss_chunk_size=0, full logits, then F.cross_entropy
    peft-lora        GPT2LMHeadModel + peft.get_peft_model (the same targets, r, alpha; dropout 0)
    ours-full        model.GPT, every parameter trained, our defaults
    ours-full-plain  the same with the full-logits loss
    hf-full          GPT2LMHeadModel, every parameter trained
Like with like is ours-*-plain against the transformers rows (the same GEMMs and the same loss); ours-lora and
ours-full are what train.py runs.
With --model FOLDER both sides load that Hugging Face folder instead (ours with checkpoint.load_model, theirs with
AutoModelForCausalLM), and the LoRA targets default to every linear layer of a LLaMA block.
They are timed interleaved, round-robin: one step of each (after an untimed "settle" step of the same
configuration, see below), then the next round. A drift in clock speed or a noisy neighbour then hits all
four alike, and each round gives a paired ratio (ours / theirs) whose median is robust to the rounds
that were disturbed. Transformers runs with attn_implementation="sdpa",
the same fused attention kernel as ours; the optimizer is the same AdamW (fused where available) with
the same parameter groups for all four. Skips with a message when transformers or peft is missing.
"""
import argparse
import os
import statistics
import sys


import torch  # noqa: E402

from bench import common, timing  # noqa: E402

NAMES = ("ours-lora", "ours-lora-plain", "peft-lora", "ours-full", "ours-full-plain", "hf-full")
LLAMA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def adamw(model, device):
    """AdamW over the trainable parameters, decay on matrices only (as GPT.configure_optimizers), the same for all
    four. fused=True (one kernel for the whole update) where this torch has it for the device: CUDA, and CPU
    since torch 2.4 (bench/train_defaults.py measures it against the default foreach path)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
    except RuntimeError:  # no fused kernel for this device in this torch
        return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))


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


def ours_pretrained(cfg):
    from training.checkpoint import load_model
    return load_model(cfg["model"]).to(cfg["device"])


def hf_pretrained(cfg):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=torch.float32,
                                                              attn_implementation="sdpa").to(cfg["device"])
    model.config.use_cache = False  # training: no KV cache to build
    return model


def build(cfg, name):
    """(step inputs -> loss function, model) for one of NAMES."""
    if name.startswith("ours"):
        model = common.make_gpt(cfg) if cfg["model"] is None else ours_pretrained(cfg)
        if name.endswith("-plain"):
            model.loss_chunk_size = 0  # full logits, then F.cross_entropy: transformers' loss path
        if name.startswith("ours-lora"):
            from lora import LoRAConfig, apply_lora
            apply_lora(model, LoRAConfig(r=cfg["r"], alpha=cfg["alpha"], dropout=0.0, targets=cfg["targets"],
                                         mode=cfg["mode"]))
        run = torch.compile(model) if cfg["compile"] else model
        return (lambda idx, targets: run(idx, targets)[1]), model
    model = hf_gpt2(cfg) if cfg["model"] is None else hf_pretrained(cfg)
    if name == "peft-lora":
        import peft
        lcfg = peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=0.0,
                               target_modules=list(cfg["targets"]), bias="none",
                               fan_in_fan_out=cfg["model"] is None)  # GPT-2's Conv1D stores W as (in, out)
        model = peft.get_peft_model(model, lcfg)
    run = torch.compile(model) if cfg["compile"] else model
    # transformers shifts the labels itself: labels = the inputs, so every position but the last has a target
    return (lambda idx, targets: run(input_ids=idx, labels=idx).loss), model


def paired(a, b):
    """Median over rounds of a[i] / b[i]: the ratio with the per-round drift cancelled."""
    return statistics.median(x / y for x, y in zip(a, b))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--mode", default="split", choices=("split", "fused"), help="our LoRA's compute path")
    p.add_argument("--settle", type=int, default=1, help="untimed steps of a configuration before its timed one")
    p.add_argument("--profile", default=None, choices=NAMES, help="print a torch.profiler table for one of them")
    p.add_argument("--model", default=None, help="a Hugging Face folder (GPT-2 or LLaMA) to load on both sides "
                   "instead of a random GPT of --preset's shape, e.g. models/smollm2-135m-instruct")
    p.add_argument("--name", default=None, help="results file name (default vs_peft, or vs_peft_<model folder>)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.model is not None:
        from model import load_hf_config
        hf = load_hf_config(args.model)  # fails early, with the folder's name, when it is not a model folder
        args.vocab_size = hf["vocab_size"]  # random token ids must fit the model's vocabulary
        args.n_layer, args.n_head = hf.get("num_hidden_layers", hf.get("n_layer")), hf.get("num_attention_heads",
                                                                                           hf.get("n_head"))
        args.n_embd = hf.get("hidden_size", hf.get("n_embd"))
        if hf.get("model_type") == "llama" and args.targets == p.get_default("targets"):
            args.targets = LLAMA_TARGETS
    args.name = args.name or ("vs_peft" if args.model is None else f"vs_peft_{os.path.basename(os.path.normpath(args.model))}")
    command = " ".join(["python", "bench/vs_peft.py", *argv])
    if args.iters is None and args.device in ("auto", "cpu") and not torch.cuda.is_available():
        args.iters = 10  # 4 configurations a round; more rounds make the paired ratios steadier
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"skipping: {e.name} is not installed (pip install transformers peft to compare against them)")
        return None
    cfg = common.resolve_args(args)
    device, dtype = cfg["device"], common.parse_dtype(cfg["dtype"], cfg["device"])
    print(f"device {common.device_label(device)}, dtype {cfg['dtype']}, compile {cfg['compile']}, threads "
          f"{cfg['threads']}; {cfg['model'] or 'GPT'} n_layer={cfg['n_layer']} n_head={cfg['n_head']} n_embd={cfg['n_embd']} "
          f"vocab={cfg['vocab_size']}, B={cfg['B']} T={cfg['T']}; LoRA r={cfg['r']} alpha={cfg['alpha']} "
          f"targets {','.join(cfg['targets'])} (ours: {cfg['mode']}); warmup {cfg['warmup']}, iters {cfg['iters']}")
    idx, targets = common.random_batch(cfg)
    names = [cfg["profile"]] if cfg["profile"] else NAMES
    runs = {}
    for name in names:
        loss_fn, model = build(cfg, name)
        runs[name] = (loss_fn, model, adamw(model, device))
    trainable = {n: timing.num_trainable(m) for n, (_, m, _) in runs.items()}
    print("trainable parameters:", ", ".join(f"{n} {t:,}" for n, t in trainable.items()))

    def phases(name):
        """forward, backward, optimizer step of one configuration, as three callables."""
        loss_fn, _, opt = runs[name]
        state = {}

        def forward():
            with timing.autocast_ctx(device, dtype):
                state["loss"] = loss_fn(idx, targets)

        def step():
            opt.step()
            opt.zero_grad(set_to_none=True)
        return [forward, lambda: state.pop("loss").backward(), step]

    if cfg["profile"]:
        ph = phases(cfg["profile"])
        one_step = lambda: [f() for f in ph]  # noqa: E731
        for _ in range(cfg["warmup"]):
            one_step()
        print(f"profile of {cfg['profile']} ({cfg['iters']} steps, sorted by self time)")
        print(timing.profile_table(one_step, device, steps=cfg["iters"]))
        return None

    # One iteration is a round: for each configuration, `settle` untimed steps, then one timed step (fwd, bwd,
    # opt). Without the settle step a step's time depends on which configuration ran just before it (the
    # allocator's and the OS's memory state: a full step after a LoRA step re-faults its gradient pages),
    # which is not what a training loop, repeating one configuration, sees. Busy rounds are re-run (timing.py).
    per = 3 * (cfg["settle"] + 1)
    cols, noise = timing.time_phases([f for n in names for _ in range(cfg["settle"] + 1) for f in phases(n)],
                                     device, cfg["warmup"], cfg["iters"])
    times = {n: dict(zip(("fwd", "bwd", "opt"), cols[per * i + per - 3:per * (i + 1)])) for i, n in enumerate(names)}
    for t in times.values():
        t["step"] = [f + b + o for f, b, o in zip(t["fwd"], t["bwd"], t["opt"])]
    print(f"rounds kept {len(cols[0])}, re-run because the CPU was busy: {common.noise_note(noise)}")

    tokens = cfg["B"] * cfg["T"]
    rows = []
    for name in names:
        s = {k: timing.summarize(v) for k, v in times[name].items()}
        rows.append(dict(name=name, trainable=trainable[name], **s, step_ms=s["step"]["median"],
                         step_min=s["step"]["min"], tok_s=tokens / s["step"]["median"] * 1e3))
    st = {n: times[n]["step"] for n in names}
    fb = {n: [f + b for f, b in zip(times[n]["fwd"], times[n]["bwd"])] for n in names}
    ratios = [  # (what, paired ratio)
        ("ours-lora-plain / peft-lora (the same loss path)", paired(st["ours-lora-plain"], st["peft-lora"])),
        ("ours-lora / peft-lora (our defaults)", paired(st["ours-lora"], st["peft-lora"])),
        ("ours-full-plain / hf-full (the same loss path)", paired(st["ours-full-plain"], st["hf-full"])),
        ("ours-full / hf-full (our defaults)", paired(st["ours-full"], st["hf-full"])),
        ("ours-lora / ours-full", paired(st["ours-lora"], st["ours-full"])),
        ("ours-lora-plain / ours-full-plain", paired(st["ours-lora-plain"], st["ours-full-plain"])),
        ("peft-lora / hf-full", paired(st["peft-lora"], st["hf-full"])),
        ("ours-lora / ours-full, fwd+bwd only", paired(fb["ours-lora"], fb["ours-full"])),
    ]
    iq = lambda t: f"{t['median']:.1f} ({t['p25']:.1f}-{t['p75']:.1f})"  # noqa: E731
    md = common.markdown_table(rows, [
        ("step", "name", None), ("fwd ms", "fwd", iq), ("bwd ms", "bwd", iq), ("opt ms", "opt", iq),
        ("step ms", "step", iq), ("min step ms", "step_min", lambda x: f"{x:.1f}"), ("trainable", "trainable", None),
        ("tok/s", "tok_s", lambda x: f"{x:,.0f}")])
    md += (f"\n\nRounds kept: {len(cols[0])}; rounds re-run because other processes used the CPU: "
           f"{common.noise_note(noise)}")
    md += "\n\nPaired ratios of step time (median over the interleaved rounds):\n\n" + "\n".join(
        f"- {what}: {v:.3f}" for what, v in ratios)
    print()
    print(md)
    env = common.environment(device, cfg["threads"])
    env["transformers"], env["peft"] = transformers.__version__, peft.__version__
    print("wrote", *common.save_results(cfg["out_dir"], cfg["name"], env, cfg, rows, md,
                                        dict(ratios=dict(ratios), noise=noise), command=command))
    return rows, ratios


if __name__ == "__main__":
    main()
