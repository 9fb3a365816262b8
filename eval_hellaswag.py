"""HellaSwag accuracy (acc, acc_norm) of any model a user can name; the scoring is evals/hellaswag.py's.

    python eval_hellaswag.py --model gpt2                     # HF folder or cached hub name
    python eval_hellaswag.py --model out-shakespeare          # our training out_dir (ckpt.pt)
    python eval_hellaswag.py --model gpt2 --quantize nf4      # the base in NF4 (quant/)
    torchrun --standalone --nproc_per_node=8 eval_hellaswag.py --model gpt2   # examples split over 8 GPUs
"""
import argparse
import os
import sys
from functools import partial

import torch
import torch.distributed as dist

from evals.hellaswag import SPLITS, download, evaluate, load_examples
from quant import METHODS
from tokenization import load_tokenizer
from tools.errors import UserError


# ---- command line --------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="HellaSwag accuracy (acc, acc_norm) of a model",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True,
                   help="HF folder or cached hub name (gpt2), training out_dir (ckpt.pt), adapter folder (LoRA, "
                        "AdaLoRA, prompt, P-tuning or prefix tuning), or a .gguf file")
    p.add_argument("--base", default=None, help="base model of an adapter folder (default: its adapter_config)")
    p.add_argument("--split", default="val", choices=SPLITS)
    p.add_argument("--file", default=None, help="evaluate this local jsonl instead of a downloaded split")
    p.add_argument("--data_dir", default="data/hellaswag", help="where downloaded splits are kept")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--batch_examples", type=int, default=4, help="examples (4 sequences each) per forward")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--quantize", default=None, choices=("", *METHODS),
                   help="quantize the base's Linear layers while loading (quant/); default: full precision, "
                        "or for a LoRA out_dir the way it trained")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="bfloat16 = bf16 autocast, CUDA only; auto = bfloat16 on CUDA, else float32")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for name, value in (("limit", args.limit), ("batch_examples", args.batch_examples)):
        if value is not None and value < 1:
            raise UserError(f"--{name}={value}: it must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device={args.device}: this machine has no CUDA device that torch can use; use --device cpu")
    ddp = "RANK" in os.environ  # launched by torchrun
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if ddp and device.startswith("cuda"):
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"  # one GPU per process
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype == "bfloat16" and not device.startswith("cuda"):
        raise UserError(f"--dtype bfloat16 is autocast on CUDA; on {device} use --dtype float32")

    if args.file is not None:
        path = args.file
    else:
        if rank == 0:
            download(args.split, args.data_dir)  # one process downloads, the others wait for the file
        if ddp:
            dist.barrier()
        path = download(args.split, args.data_dir)
    examples = load_examples(path, args.limit)

    from training.checkpoint import load_model  # our out_dir, an HF folder, or an adapter on its base
    model = load_model(args.model, base=args.base, quantize=args.quantize).to(device)
    tokenizer = load_tokenizer(args.base or args.model, model.config.vocab_size)  # a ValueError names what is missing
    # no special tokens: context and endings are encoded separately and concatenated, so a BOS would land mid-sequence
    encode = partial(tokenizer.encode, add_special_tokens=False)

    result = evaluate(model, examples, device, encode=encode, batch_examples=args.batch_examples, rank=rank,
                      world_size=world_size, progress=rank == 0, amp=dtype == "bfloat16")
    if rank == 0:
        n = result["n"]
        print(f"hellaswag {path} | model {args.model} | {n} examples | {world_size} process(es) | {dtype}")
        print(f"acc:      {result['correct']}/{n} = {result['acc']:.4f}")
        print(f"acc_norm: {result['correct_norm']}/{n} = {result['acc_norm']:.4f}")
    if ddp:
        dist.barrier()  # leave together (see the end of train.py)
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    from tools.errors import report_user_errors
    main(report_user_errors(sys.argv[1:]))
