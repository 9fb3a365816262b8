"""Greedy generation: our batch_generate (model/generate.py) against transformers' model.generate, tokens/s.

    python bench/generate.py                                   # SmolLM2-135M-Instruct, batch 1 and 16, fp32 CPU
    python bench/generate.py --batch_sizes 16 --new_tokens 64 --prompt_len 64
    python bench/generate.py --profile ours --batch_sizes 16   # torch.profiler table of one side instead

Both sides load the same Hugging Face folder (ours with training.checkpoint.load_model, theirs with
AutoModelForCausalLM, attn_implementation="sdpa"), in the same dtype, and decode the same prompts greedily
(do_sample=False) for exactly --new_tokens tokens: EOS is switched off on both sides (eos_id=None; transformers'
eos_token_id=None), so both produce the same number of tokens whatever the text. The prompts are random token ids
of lengths spread over [prompt_len / 2, prompt_len] (batch 1: the first of them): ours takes them as a list,
transformers as the left-padded batch with its attention_mask, the way batch generation is done with it.
A round times one call of each at every batch size, the two sides in alternating order; --iters rounds, after
--warmup untimed ones. The ratio is paired: per round, ours tokens/s / theirs, then the median over rounds, so a
neighbour's burst that slows one round slows both sides of it. Each row also checks that the two agree token for
token (greedy, same weights: they should, up to float ties).
"""
import argparse
import os
import statistics
import sys
import time

import torch

from bench import common, timing


def load_models(cfg, dtype):
    import transformers

    from training.checkpoint import load_model
    ours = load_model(cfg["model"]).to(cfg["device"], dtype).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(cfg["model"], dtype=dtype,
                                                               attn_implementation="sdpa").to(cfg["device"]).eval()
    return ours, theirs


def make_prompts(cfg, vocab_size):
    """max(batch_sizes) prompts of random token ids, lengths in [prompt_len / 2, prompt_len]."""
    g = torch.Generator().manual_seed(0)
    n, T = max(cfg["batch_sizes"]), cfg["prompt_len"]
    lengths = torch.randint(max(1, T // 2), T + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab_size, (L,), generator=g).tolist() for L in lengths]


def runners(cfg, ours, theirs, prompts):
    """{name: call} for one batch of prompts: each call returns the new tokens, one list per prompt."""
    from model.generate import batch_generate
    N, device = cfg["new_tokens"], cfg["device"]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=device)  # (B, T), left-padded
    attention_mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=device)

    def run_ours():
        return batch_generate(ours, prompts, N, temperature=0)

    def run_theirs():
        with torch.no_grad():
            # eos_token_id=None as an argument: a GenerationConfig whose eos_token_id is None takes the model's
            return theirs.generate(ids, attention_mask=attention_mask, max_new_tokens=N, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[:, T:].tolist()
    return {"ours": run_ours, "transformers": run_theirs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p, model_args=False)
    p.add_argument("--model", default=os.path.join(common.ROOT, "models", "smollm2-135m-instruct"),
                   help="a Hugging Face folder both sides load (default: SmolLM2-135M-Instruct, `make smollm2`)")
    p.add_argument("--batch_sizes", default="1,16", help="comma separated")
    p.add_argument("--prompt_len", type=int, default=64, help="the longest prompt; the others are down to half")
    p.add_argument("--new_tokens", type=int, default=64, help="tokens generated per prompt (EOS off on both sides)")
    p.add_argument("--profile", default=None, choices=("ours", "transformers"),
                   help="print a torch.profiler table of one side at the largest batch size instead of timing")
    p.add_argument("--name", default=None, help="results file name (default generate_<model folder>)")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    args.name = args.name or f"generate_{os.path.basename(os.path.normpath(args.model))}"
    try:
        import transformers
    except ImportError as e:
        print(f"skipping: {e.name} is not installed (pip install transformers to compare against it)")
        return None
    if args.dtype is None:
        args.dtype = "fp32"  # weights in this dtype on both sides: generation runs no autocast
    cfg = common.resolve_args(args)
    device, dtype = cfg["device"], common.parse_dtype(cfg["dtype"], cfg["device"])
    ours, theirs = load_models(cfg, dtype)
    prompts = make_prompts(cfg, ours.config.vocab_size)
    print(f"device {common.device_label(device)}, dtype {cfg['dtype']}, threads {cfg['threads']}; {cfg['model']}; "
          f"batch sizes {cfg['batch_sizes']}, prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{cfg['new_tokens']} new tokens; warmup {cfg['warmup']}, rounds {cfg['iters']}")
    calls = {B: runners(cfg, ours, theirs, prompts[:B]) for B in cfg["batch_sizes"]}
    if cfg["profile"]:
        B = cfg["batch_sizes"][-1]
        print(f"profile of {cfg['profile']} at batch {B} (one call, sorted by self time)")
        print(timing.profile_table(calls[B][cfg["profile"]], device, steps=1))
        return None

    seconds = {(B, name): [] for B in calls for name in calls[B]}
    others, agree = [], {}
    load = timing.OtherLoad(device)
    for r in range(cfg["warmup"] + cfg["iters"]):
        load.start()
        for B, pair in calls.items():
            for name in (list(pair) if r % 2 == 0 else list(pair)[::-1]):  # alternate which side goes first
                timing.sync(device)
                t0 = time.perf_counter()
                out = pair[name]()
                timing.sync(device)
                if r >= cfg["warmup"]:
                    seconds[B, name].append(time.perf_counter() - t0)
                assert all(len(row) == cfg["new_tokens"] for row in out), f"{name} stopped early"
                agree.setdefault(B, {})[name] = out
        if r >= cfg["warmup"]:
            others.append(load.fraction())
        print(f"round {r + 1 - cfg['warmup']}" if r >= cfg["warmup"] else "warm-up round",
              " ".join(f"B={B} {name} {seconds[B, name][-1]:.2f}s" for B, name in seconds if r >= cfg["warmup"]))

    rows = []
    for B in calls:
        tok = B * cfg["new_tokens"]
        ours_s, theirs_s = seconds[B, "ours"], seconds[B, "transformers"]
        same = sum(a == b for a, b in zip(agree[B]["ours"], agree[B]["transformers"]))
        rows.append(dict(batch=B, ours_tok_s=tok / statistics.median(ours_s),
                         theirs_tok_s=tok / statistics.median(theirs_s),
                         ratio=statistics.median(b / a for a, b in zip(ours_s, theirs_s)),  # ours tok/s / theirs
                         ours_s=timing.summarize(ours_s), theirs_s=timing.summarize(theirs_s),
                         rows_equal=f"{same}/{B}"))
    md = common.markdown_table(rows, [
        ("batch", "batch", None), ("ours tok/s", "ours_tok_s", lambda x: f"{x:,.1f}"),
        ("transformers tok/s", "theirs_tok_s", lambda x: f"{x:,.1f}"),
        ("ours / transformers (paired median)", "ratio", lambda x: f"{x:.3f}"),
        ("rows token-for-token equal", "rows_equal", None)])
    md += (f"\n\n{cfg['iters']} interleaved rounds; tokens/s = batch x {cfg['new_tokens']} new tokens / median "
           f"seconds of one call (prefill included); prompts of {min(map(len, prompts))}-"
           f"{max(map(len, prompts))} tokens. Other processes used {statistics.median(others or [0]):.0%} of the "
           f"machine (median over rounds; worst {max(others or [0]):.0%}).")
    print()
    print(md)
    env = common.environment(device, cfg["threads"])
    env["transformers"] = transformers.__version__
    command = " ".join(["python", "bench/generate.py", *argv])
    print("wrote", *common.save_results(cfg["out_dir"], cfg["name"], env, cfg, rows, md, dict(others=others),
                                        command=command))
    return rows


if __name__ == "__main__":
    main()
