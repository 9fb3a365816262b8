"""One training loop for pretraining, full fine-tuning and parameter-efficient fine-tuning (LoRA, AdaLoRA, prompt
tuning, P-tuning, prefix tuning: `peft_method`, see adapters.py).

    python train.py config/shakespeare_cpu.py                       # one process (CPU, MPS or one GPU)
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_124m_fineweb.py
    torchrun --standalone --nproc_per_node=8 train.py ... --parallel=fsdp   # shard a model too big for one GPU

Reads top to bottom: config, distributed setup, data, model (+ adapter), optimizer, then the loop.
Every `total_batch_size` tokens is one optimizer step, made of `grad_accum_steps` micro-batches of
batch_size x block_size tokens on each of `world_size` processes.
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------------------------
# config: every global below can be overridden by config/*.py files and --key=value flags
out_dir = "out"
data_dir = "data/shakespeare"
init_from = "scratch"  # 'scratch' | 'resume' | a Hugging Face folder or name | an out_dir of ours
model_type = "gpt2"  # a key of model.MODELS: 'gpt2' | 'llama' (for init_from='scratch'; else the checkpoint decides)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024  # the sequence length T we train on
vocab_size = 50304
dropout = 0.0
bias = True
n_kv_head = 0  # llama: key/value heads for grouped-query attention (0 = n_head)
intermediate_size = 0  # llama: SwiGLU hidden size (0 = the usual 8/3 * n_embd, rounded to 256)
rope_theta = 10000.0  # llama
batch_size = 16  # micro-batch B
total_batch_size = 524288  # tokens per optimizer step (2**19, ~0.5M as GPT-3 small)
max_steps = 19073
warmup_steps = 715
max_lr = 6e-4
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 = off
eval_interval = 250
eval_iters = 20
sample_interval = 250  # 0 = off
sample_prompt = "\n"
sample_tokens = 64
num_samples = 2
checkpoint_interval = 1000  # also saved at the end
hellaswag_every = 0  # 0 = off
hellaswag_limit = 0  # 0 = all 10042 val examples
log_interval = 1
compile = "auto"  # torch.compile the model: 'auto' = on for CUDA, off on CPU (bench/results/cpu_train_defaults.md)
dtype = "auto"  # 'auto' (bfloat16 autocast on CUDA, float32 elsewhere) | 'float32' | 'bfloat16' | 'float16'
device = "auto"  # 'auto' | 'cpu' | 'cuda' | 'cuda:1' | 'mps'
seed = 1337
parallel = "ddp"  # under torchrun: 'ddp' (a whole model per GPU) | 'fsdp' (each GPU holds 1/world of it: parallel.py)
wandb_log = False
wandb_project = "nanolora"
wandb_run_name = "run"
peft_method = "lora"  # 'lora' | 'adalora' | 'prompt' | 'ptuning' | 'prefix' | 'none' (see adapters.py)
adalora_init_r = 12  # adalora (also uses lora_alpha, lora_dropout, lora_targets): every layer's rank at the start
adalora_target_r = 8  # the average rank it is pruned to, by step max_steps - adalora_tfinal
adalora_tinit = 0  # steps before pruning starts
adalora_tfinal = 0  # last steps with the ranks fixed
adalora_deltaT = 1  # prune every deltaT steps
adalora_orth_reg_weight = 0.5
num_virtual_tokens = 20  # prompt, ptuning, prefix: learned positions before every sequence
prompt_init = "random"  # prompt: 'random' | 'sample_vocab' | 'text'; prefix: 'random' | 'zero'; ptuning: 'random'
prompt_init_text = ""  # prompt with prompt_init='text'
encoder_type = "MLP"  # ptuning: 'MLP' | 'LSTM'
encoder_hidden_size = 0  # ptuning, prefix with projection: 0 = the model's width
prefix_projection = False  # prefix: keys/values produced by an MLP (Li & Liang's reparameterisation)
merge_on_save = False  # LoRA, AdaLoRA: also write out_dir/merged, a Hugging Face folder with BA folded into W
quantize = ""  # '' | 'nf4' | 'int8': LoRA on a loaded base quantized while loading (QLoRA with 'nf4'), model/quant.py
loss_chunk_size = 1024  # tokens per chunk of the linear + cross-entropy (model/chunked_loss.py); 0 = full logits
activation_checkpointing = False  # keep only each block's input, recompute the rest in backward (~1/3 more compute)
cpu_mmap_threshold = 65536  # CPU (glibc): tensors of this many bytes or more are freed back to the OS (model/memory.py)
# LoRA: every field of LoRAConfig (lora/inject.py) is a key lora_<field> with LoRAConfig's default: lora_alpha,
# lora_dropout, lora_targets (a tuple of names or .-suffixes, or a str that is a regex: the same in a config file and
# on the command line, --lora_targets='("q_proj","v_proj")'), lora_mode ('split' | 'fused'), lora_rslora,
# lora_modules_to_save, lora_init ('kaiming' | 'gaussian' | 'pissa' | 'pissa_niter_K'), lora_use_dora (DoRA),
# lora_loraplus_lr_ratio (LoRA+: lora_B's learning rate over lora_A's)
from lora import lora_settings  # noqa: E402

globals().update(lora_settings())
lora_r = 0  # 0 = no LoRA: with peft_method='lora', train all weights
overwrite = False  # True: replace the run in out_dir (by default a new run refuses an out_dir holding another run)
objective = "lm"  # 'lm': every token of the stream is a target | 'sft': prepare_sft.py's examples, loss on answers
packing = True  # sft: several examples per row (block-diagonal attention) | False: one a row, padded
eval_generate_every = 0  # sft: greedy exact match on the val prompts every N steps (0 = off)
eval_generate_limit = 0  # sft: score only the first N val prompts (0 = all)
dpo_beta = 0.1  # dpo: the strength of the pull toward the reference (dpo.py)
dpo_loss = "sigmoid"  # dpo: 'sigmoid' (DPO) | 'ipo' | 'hinge'
dpo_label_smoothing = 0.0  # dpo, sigmoid: the chance that a label is flipped (conservative DPO)
dpo_reference = "auto"  # dpo: 'adapter_off' | 'precompute' | 'copy'; 'auto' = adapter_off for LoRA, else precompute
# -----------------------------------------------------------------------------------------------
from configurator import configure  # noqa: E402
from tools.errors import report_user_errors  # noqa: E402
from training.validate import loaded_model_config, resume_config, validate_config  # noqa: E402

argv = report_user_errors(sys.argv[1:])  # user errors end the run with one line (--debug: with the traceback)
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))]
given = configure({k: globals()[k] for k in config_keys}, argv)  # the keys set by config files and flags
globals().update(given)
config = {k: globals()[k] for k in config_keys}  # what this run used: logged and checkpointed
checkpoint, resume_notes = None, []
if init_from == "resume":  # the run's settings come back from its checkpoint; only some may change (validate.py)
    from training.checkpoint import read_checkpoint
    checkpoint = read_checkpoint(out_dir)
    config, resume_notes = resume_config(checkpoint["config"], config, given, out_dir)
    globals().update(config)
    if checkpoint["step"] >= max_steps:
        raise ValueError(f"{out_dir} is already trained to step {checkpoint['step']} and max_steps={max_steps}: "
                         f"pass a larger --max_steps to train on")
validate_config(config)  # every value by range and meaning, once, here
if objective == "dpo" and dpo_reference == "auto":
    dpo_reference = config["dpo_reference"] = "adapter_off" if lora_r > 0 else "precompute"
# -----------------------------------------------------------------------------------------------

import adapters  # noqa: E402
from training.checkpoint import (fingerprint, load_base, model_from_checkpoint, rng_state, save_checkpoint,  # noqa: E402
                        set_rng_state)
from training.optim import configure_adamw  # noqa: E402
from training.parallel import (all_ranks_true, gather_state, load_optimizer_state, local, plain_copy,  # noqa: E402
                      set_grad_sync, wrap)
from loaders.tokens import DataLoaderLite  # noqa: E402
from model import model_class  # noqa: E402
from training.flops import flops_per_token, peak_for_name  # noqa: E402
from training.run_dir import claim_out_dir, finite_or_none, truncate_log  # noqa: E402
from training.memory import estimate_peak_bytes, peak_memory_bytes, set_cpu_mmap_threshold  # noqa: E402
from tokenization.tokenizer import tokenizer_for  # noqa: E402

# distributed setup: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain `python` runs one process
ddp = int(os.environ.get("RANK", -1)) != -1
if ddp:
    ddp_rank, ddp_local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "auto":
        device = f"cuda:{ddp_local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
else:
    ddp_rank, ddp_local_rank, world_size = 0, 0, 1
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
master_process = ddp_rank == 0  # logs, samples and checkpoints
device_type = "cuda" if device.startswith("cuda") else device
if compile not in (True, False, "auto"):
    raise ValueError(f"compile={compile!r}: use 'auto' (on for CUDA only), True or False")
if compile == "auto":
    compile = device_type == "cuda"
if wandb_log and master_process:
    try:
        import wandb  # optional: WANDB_MODE=offline works without an account
    except ImportError:
        raise SystemExit("wandb_log=True needs the wandb package: pip install wandb (or --wandb_log=False)") from None

if dtype == "auto":
    dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
if device_type != "cuda" and dtype != "float32":
    raise ValueError(f"dtype={dtype!r} on {device_type}: low-precision autocast is for CUDA (bf16 is ~400x "
                     f"slower on CPU); use --dtype=float32")
if device_type == "cpu" and cpu_mmap_threshold > 0:  # resident memory then follows the live tensors (model/memory.py)
    set_cpu_mmap_threshold(cpu_mmap_threshold)
sharded = ddp and parallel == "fsdp"  # one process has nothing to shard: parallel only matters under torchrun
# weights and optimizer stay fp32; autocast runs the matmuls in bf16/fp16 on CUDA. FSDP instead gathers the weights
# in bf16 and reduces the gradients in fp32 (its MixedPrecisionPolicy), so its training forward needs no autocast;
# sampling keeps it (the KV cache is allocated in the weights' fp32)
autocast = torch.autocast(device_type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext()
train_autocast = nullcontext() if sharded else autocast
scaler = torch.amp.GradScaler("cuda", enabled=(dtype == "float16"))
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 matmuls that remain
    torch.backends.cudnn.allow_tf32 = True

torch.manual_seed(seed)  # the same initial weights on every rank (DDP broadcasts rank 0's; FSDP shards them)
tokens_per_micro_step = batch_size * block_size * world_size
if total_batch_size % tokens_per_micro_step != 0:
    raise ValueError(f"total_batch_size={total_batch_size} must be divisible by batch_size*block_size*world_size "
                     f"= {batch_size}*{block_size}*{world_size} = {tokens_per_micro_step}; e.g. "
                     f"--total_batch_size={max(1, total_batch_size // tokens_per_micro_step) * tokens_per_micro_step}")
grad_accum_steps = total_batch_size // tokens_per_micro_step
# out_dir is this run's: a new run refuses one that holds another run (or its own base) unless overwrite=True
claim_out_dir(out_dir, init_from, overwrite, argv, master=master_process)
if master_process:
    print(f"total batch: {total_batch_size:,} tokens = {grad_accum_steps} micro-steps x {batch_size} x {block_size} "
          f"x {world_size} process(es){f' ({parallel})' if ddp else ''}; device {device}, dtype {dtype}")
    os.makedirs(out_dir, exist_ok=True)

if objective == "dpo":  # preference pairs: (x, y, stored reference log-probs) with 2B rows (dpo_data.py)
    from loaders.dpo import DPOLoader
    train_loader = DPOLoader(data_dir, batch_size, block_size, ddp_rank, world_size, "train", seed)
    val_loader = DPOLoader(data_dir, batch_size, block_size, ddp_rank, world_size, "val", seed)
elif objective == "sft":  # task examples: (x, y, position_ids) with y = -1 off the answers (sft_data.py)
    from loaders.sft import SFTLoader
    train_loader = SFTLoader(data_dir, batch_size, block_size, ddp_rank, world_size, "train", packing, seed)
    val_loader = SFTLoader(data_dir, batch_size, block_size, ddp_rank, world_size, "val", packing, seed)
else:
    train_loader = DataLoaderLite(data_dir, batch_size, block_size, ddp_rank, world_size, split="train")
    val_loader = DataLoaderLite(data_dir, batch_size, block_size, ddp_rank, world_size, split="val")

# the memory a step needs is measured against what the process holds before the model exists
if device_type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
idle_memory = peak_memory_bytes(device)

# -----------------------------------------------------------------------------------------------
# model: from scratch, resumed, or loaded (Hugging Face folder or our own out_dir) for fine-tuning, plus its adapter
# base: the model this run started from (None: scratch); an adapter run's frozen base; it also names the tokenizer
start_step, base, base_fingerprint = 0, None, None
if init_from == "resume":
    # an adapter run rebuilds its base (refused if its fingerprint changed) and re-applies its adapter
    model = model_from_checkpoint(checkpoint, dropout=dropout)
    start_step, base, base_fingerprint = checkpoint["step"], checkpoint["base"], checkpoint.get("base_fingerprint")
    train_loader.load_state_dict(checkpoint["loader"])
    if master_process:
        truncate_log(Path(out_dir) / "log.jsonl", start_step)  # the steps from start_step on are logged anew
        print(f"resuming from {out_dir} at step {start_step}"
              + (f"; applying {', '.join(resume_notes)}" if resume_notes else ""))
elif init_from == "scratch":
    model_cls = model_class(model_type)
    model = model_cls(model_cls.scratch_config(config))
    base_fingerprint = fingerprint(model) if objective == "dpo" else None
else:
    # to fine-tune fully, or an adapter run's frozen base (quantized while loading for QLoRA; a LoRA out_dir: merged)
    model = load_base(init_from, quantize=quantize, dropout=dropout)
    base = os.path.abspath(init_from) if os.path.exists(init_from) else init_from
    config = loaded_model_config(config, given, model, init_from)  # its architecture, which flags cannot change
if init_from != "resume":
    method = "none" if peft_method == "lora" and lora_r == 0 else peft_method
    if (method != "none" or objective == "dpo") and base is not None:
        # a resume refuses a base that has changed; DPO's precomputed reference is named by it
        base_fingerprint = fingerprint(model)
    # prompt_init='text' starts the prompt from these words' embeddings
    text_init = method == "prompt" and prompt_init == "text"
    encode = tokenizer_for(base, model.config.vocab_size).encode if text_init else None
    # swaps target Linears for LoRA/AdaLoRA layers or attaches a prompt encoder, and freezes everything else
    adapters.apply(model, method, adapters.config_from_settings(method, config), encode)
peft_method = adapters.method_of(model)  # what this run trains (a resumed run: what its checkpoint had)
lora_config = getattr(model, "lora_config", None)  # a LoRA run's config: DPO's reference is its adapter switched off
if block_size > model.max_seq_len:
    raise ValueError(f"block_size={block_size} is longer than the model's {model.max_seq_len} positions"
                     + (f" (after {model.num_virtual_tokens} virtual tokens)" if model.num_virtual_tokens else ""))
if objective == "sft":
    if train_loader.header["vocab_size"] > model.config.vocab_size:
        raise ValueError(f"{data_dir} was tokenized with {train_loader.header['tokenizer']} "
                         f"({train_loader.header['vocab_size']} tokens), more than the model's vocab_size "
                         f"{model.config.vocab_size}: prepare it with prepare_sft.py --tokenizer <the model's folder>")
else:
    for loader in (train_loader, val_loader):
        loader.check_vocab(model.config.vocab_size)  # token ids the model has no embedding for are refused
allocator = None
if peft_method == "adalora":
    from lora.adalora import RankAllocator, orth_regularization
    allocator = RankAllocator(model, model.adalora_config)  # prunes the ranks after each optimizer step
    if checkpoint is not None and "allocator" in checkpoint:
        allocator.load_state_dict(checkpoint["allocator"])
if peft_method != "none":
    from lora import print_trainable_parameters
    if master_process:
        print_trainable_parameters(model)
raw_model = model  # the model itself (sharded in place under fsdp): checkpoints, sampling and the optimizer use it
# fsdp shards after LoRA (and activation checkpointing) changed the modules, and before the optimizer sees them
if sharded:  # shard on the CPU: each rank moves only its 1/world_size of the weights to its device
    wrap(model, "fsdp", device_type, ddp_local_rank, param_dtype=torch.bfloat16 if dtype == "bfloat16" else None)
model.to(device)
raw_model.loss_chunk_size, raw_model.activation_checkpointing = loss_chunk_size, activation_checkpointing
if compile:
    model = torch.compile(model)
if ddp and not sharded:
    model = wrap(model, "ddp", device_type, ddp_local_rank)

ref_model = None  # dpo_reference='copy': the frozen starting model
if objective == "dpo":
    import objectives.dpo as dpo
    if dpo_reference == "copy":  # the starting model: this one before any step, or reloaded from `base` on resume
        if init_from == "resume":
            if base is None:
                raise ValueError(f"resume of {out_dir}: dpo_reference='copy' needs the starting model, and a run from "
                                 f"scratch has none to reload; start it again with dpo_reference='precompute'")
            ref_model = load_base(base)
            if fingerprint(ref_model) != base_fingerprint:
                raise ValueError(f"resume of {out_dir}: its starting model {base} has changed since the run began; "
                                 f"the reference would differ. Restore it, or start a new run")
        else:
            import copy
            ref_model = copy.deepcopy(raw_model)
        ref_model.requires_grad_(False).eval().to(device)
        if master_process:
            copy_mib = sum(p.numel() * p.element_size() for p in ref_model.parameters()) / 2**20
            print(f"dpo reference: a frozen copy of the model, {copy_mib:,.1f} MiB more memory")
    elif dpo_reference == "precompute":
        from loaders.dpo import precompute_reference, reference_path

        def starting_logps(x, y):  # the starting model: LoRA switched off (B = 0 at a fresh start anyway)
            with autocast:
                return dpo.reference_logps(x, y, "adapter_off" if lora_config else "copy", raw_model, raw_model)

        path = reference_path(data_dir, base_fingerprint)
        if init_from == "resume" and lora_config is None and not path.exists():
            raise ValueError(f"resume of {out_dir}: its reference log-probs {path} are gone, and a full fine-tune "
                             f"cannot recompute them from trained weights; start the run again")
        raw_model.eval()
        precompute_reference((train_loader, val_loader), starting_logps, path, device, master_process, ddp)
        raw_model.train()
    elif master_process:
        print("dpo reference: the model with its LoRA adapter switched off (no second model in memory)")

optimizer = configure_adamw(raw_model, weight_decay, max_lr, (beta1, beta2), device_type, verbose=master_process)
# from here on each rank draws its own dropout masks (nanoGPT's seed_offset): with one seed everywhere, every rank
# would drop the same positions of its micro-batch
torch.manual_seed(seed + ddp_rank)
if checkpoint is not None:
    load_optimizer_state(raw_model, optimizer, checkpoint["optimizer"])  # the same file from one process, ddp or fsdp
    if len(checkpoint["rng"]) == world_size:  # one RNG state per rank: each continues its own stream
        set_rng_state(checkpoint["rng"], ddp_rank, device)
    elif master_process:
        print(f"the checkpoint has RNG states for {len(checkpoint['rng'])} process(es) and this run has {world_size}:"
              f" the RNG restarts from seed + rank, so dropout will not repeat an uninterrupted run bit for bit")
    checkpoint = None  # free the memory
# dpo: a micro-batch of batch_size pairs is 2 x batch_size rows, and its log-probs come from the full logits
memory_estimate = estimate_peak_bytes(raw_model, batch_size * (2 if objective == "dpo" else 1), block_size,
                                      loss_chunk_size=0 if objective == "dpo" else None,
                                      act_bytes=4 if dtype == "float32" else 2, device=device)
if master_process:
    print(f"memory model, peak of a training step: {memory_estimate.summary()}")

# the tokenizer of the model (tokenizer.py): for samples, and for HellaSwag, which cannot run without it
try:
    tokenizer = tokenizer_for(base, raw_model.config.vocab_size)
except (ValueError, FileNotFoundError, ImportError) as e:
    if hellaswag_every > 0:
        raise
    tokenizer = None
    if master_process and sample_interval > 0:
        print(f"no samples: {e}")
# under fsdp every rank runs the forward passes (each holds a shard of the weights); rank 0 prints
sampling = (master_process or sharded) and sample_interval > 0 and tokenizer is not None


def get_lr(step):
    """Linear warmup to max_lr, then cosine decay to min_lr at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def dpo_micro_step(eval_model, x, y, stored):
    """The DPO loss (mean over the micro-batch's pairs) and its metric sums; x, y (2B, L), stored (2B,) or None."""
    with autocast:
        # the reference first: its logits are freed before the policy's forward keeps activations for backward,
        # so the step's peak memory is the policy's, as in an SFT step on the same rows (bench/dpo_memory.py)
        ref = dpo.reference_logps(x, y, dpo_reference, raw_model, ref_model, stored)  # (2B,) no gradients
        logps = dpo.sequence_logps(eval_model(x)[0], y)  # (2B,) the policy, with gradients when training
    losses, chosen_rewards, rejected_rewards = dpo.dpo_loss(logps, ref, dpo_beta, dpo_loss, dpo_label_smoothing)
    return losses.mean(), dpo.metric_sums(losses, chosen_rewards, rejected_rewards, logps)


@torch.no_grad()
def dpo_val_metrics():
    """TRL's metrics (eval_ prefixed) over the val pairs of all ranks, up to eval_iters batches per rank."""
    eval_model = getattr(model, "module", model)  # ranks may hold different numbers of batches: no DDP forward
    eval_model.eval()
    sums = torch.zeros(len(dpo.METRICS) + 1, device=device)
    for x, y, stored in val_loader.eval_batches(eval_iters):
        sums += dpo_micro_step(eval_model, x.to(device), y.to(device),
                               stored.to(device) if stored is not None else None)[1]
    if ddp:
        dist.all_reduce(sums)
    eval_model.train()
    return dpo.metric_means(sums, prefix="eval_")


@torch.no_grad()
def estimate_val_loss():
    if objective == "sft":
        return sft_val_loss()
    model.eval()
    val_loader.reset()
    loss_sum = torch.zeros((), device=device)
    for _ in range(eval_iters):
        x, y = val_loader.next_batch()
        with autocast:
            _, loss = model(x.to(device), y.to(device))
        loss_sum += loss.detach().float()
    if ddp:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    model.train()
    return loss_sum.item() / eval_iters


@torch.no_grad()
def sft_val_loss():
    """Mean loss over every answer token of the val batches of all ranks (up to eval_iters batches per rank)."""
    eval_model = getattr(model, "module", model)  # ranks may hold different numbers of batches: no DDP forward
    eval_model.eval()
    sums = torch.zeros(2, device=device)  # summed loss, number of target tokens
    for x, y, pos in val_loader.eval_batches(eval_iters):
        x, y, pos = x.to(device), y.to(device), pos.to(device) if pos is not None else None
        with autocast:
            _, loss = eval_model(x, y, position_ids=pos)
        n = (y != -1).sum()
        sums += torch.stack([loss.float() * n, n.float()])
    if ddp:
        dist.all_reduce(sums)
    eval_model.train()
    return (sums[0] / sums[1]).item()


def val_exact_match():
    from evals.exact_match import exact_match, tokenizer_of
    with autocast:
        correct, n = exact_match(raw_model, val_loader.examples, tokenizer_of(val_loader.header), device, ddp_rank,
                                 world_size, eval_generate_limit)
    return correct / n


def print_samples(step):
    """A few continuations of sample_prompt, from a generator of their own: sampling never shifts the
    training RNG, so a resumed run stays identical to an uninterrupted one."""
    raw_model.eval()
    prompt = torch.tensor(tokenizer.encode(sample_prompt), dtype=torch.long, device=device).repeat(num_samples, 1)
    gen = torch.Generator(device=device).manual_seed(seed + step)
    new_tokens = min(sample_tokens, raw_model.max_seq_len - prompt.size(1))  # the KV cache holds max_seq_len
    with autocast:
        out = raw_model.generate(prompt, new_tokens, temperature=1.0, top_k=50, eos_id=tokenizer.eos_id,
                                 generator=gen)
    raw_model.train()
    for i in range(num_samples if master_process else 0):
        print(f"sample {i}: {tokenizer.decode(out[i].tolist())!r}")


def hellaswag_accuracy():
    import evals.hellaswag as eval_hellaswag
    if master_process:
        eval_hellaswag.download("val", "data/hellaswag")  # once, before any rank reads it
    if ddp:
        dist.barrier()
    path = eval_hellaswag.download("val", "data/hellaswag")  # now cached: every rank just gets the path
    examples = eval_hellaswag.load_examples(path, limit=hellaswag_limit or None)
    # each rank scores its stride of the examples; the counts are all-reduced inside evaluate
    encode = partial(tokenizer.encode, add_special_tokens=False)  # context and endings are encoded apart: no BOS
    return eval_hellaswag.evaluate(raw_model, examples, device, encode, rank=ddp_rank, world_size=world_size,
                                   amp=dtype != "float32")


wandb_run = None
if wandb_log and master_process:
    wandb_run = wandb.init(project=wandb_project, name=wandb_run_name, config=config)
log_path = Path(out_dir) / "log.jsonl"
flops_per_step = flops_per_token(raw_model, block_size, raw_model.config.n_layer, raw_model.config.n_embd) * total_batch_size
# MFU: achieved FLOP/s over the GPU's bf16 peak (None on CPU, in fp32, or for a GPU not in the table)
peak_flops = peak_for_name(torch.cuda.get_device_name(device)) if device_type == "cuda" and dtype != "float32" else None


saved_step = start_step if init_from == "resume" else None  # the step of the checkpoint in out_dir


def stop_non_finite(what):
    """End the run (every rank) without applying or saving non-finite weights, saying what is on disk."""
    if master_process:
        kept = (f"{out_dir}/ckpt.pt holds the weights of step {saved_step}, all finite" if saved_step is not None
                else f"no checkpoint was written to {out_dir}")
        print(f"{what}: stopping without applying this update. {kept}. Lower max_lr (now {max_lr:g}) or check "
              f"the data, then start again" + (" or resume with --init_from=resume" if saved_step else ""))
    if ddp:
        dist.destroy_process_group()
    sys.exit(1)


def save(step):
    """Every rank calls this: rank 0 writes the checkpoint, with the RNG states of all ranks gathered into it."""
    global saved_step
    bad = [n for n, p in raw_model.named_parameters() if p.requires_grad and not torch.isfinite(local(p)).all()]
    if not all_ranks_true(not bad, device):  # under fsdp each rank checks its shards: all stop together
        stop_non_finite(f"step {step}: {len(bad)} weights are not finite" + (f" ({', '.join(bad[:3])} ...)" if bad else
                        " on another rank"))
    mine = rng_state(device)
    rng_states = [mine]
    if ddp:  # one entry per rank, in rank order
        rng_states = [None] * world_size
        dist.all_gather_object(rng_states, mine)
    save_checkpoint(out_dir, raw_model, optimizer, step, config, train_loader.state_dict(), base, rng_states,
                    base_fingerprint, extra={"allocator": allocator.state_dict()} if allocator is not None else None)
    # (every rank calls it: fsdp gathers the shards, rank 0 writes)
    saved_step = step


# -----------------------------------------------------------------------------------------------
# the loop
for step in range(start_step, max_steps):
    last_step = step == max_steps - 1
    record = {"step": step}
    if eval_interval > 0 and (step % eval_interval == 0 or last_step) and objective == "dpo":
        record.update(dpo_val_metrics())
        record["val_loss"] = record["eval_loss"]
        if master_process:
            print(f"step {step}: val loss {record['val_loss']:.4f}, reward accuracy "
                  f"{record['eval_rewards/accuracies']:.4f}, margin {record['eval_rewards/margins']:.4f}")
    elif eval_interval > 0 and (step % eval_interval == 0 or last_step):
        record["val_loss"] = estimate_val_loss()
        if master_process:
            print(f"step {step}: val loss {record['val_loss']:.4f}")
    if hellaswag_every > 0 and (step % hellaswag_every == 0 or last_step):
        result = hellaswag_accuracy()
        record["hellaswag_acc"], record["hellaswag_acc_norm"] = result["acc"], result["acc_norm"]
        if master_process:
            print(f"step {step}: hellaswag acc_norm {record['hellaswag_acc_norm']:.4f}")
    if eval_generate_every > 0 and (step % eval_generate_every == 0 or last_step):
        record["val_exact_match"] = val_exact_match()
        if master_process:
            print(f"step {step}: val exact match {record['val_exact_match']:.4f}")
    if sampling and step > 0 and (step % sample_interval == 0 or last_step):
        print_samples(step)

    t0 = time.perf_counter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_accum = torch.zeros((), device=device)
    batches = [train_loader.next_batch() for _ in range(grad_accum_steps)]  # (x, y) or (x, y, position_ids | ref)
    dpo_sums = torch.zeros(len(dpo.METRICS) + 1, device=device) if objective == "dpo" else None
    if objective == "sft":
        # micro-batches hold different numbers of answer tokens: count the whole step's, over all ranks
        step_targets = sum((b[1] != -1).sum() for b in batches).to(device)
        if ddp:
            dist.all_reduce(step_targets)
    for micro_step, batch in enumerate(batches):
        x, y = batch[0].to(device), batch[1].to(device)
        if ddp:
            # all-reduce (ddp) or reduce-scatter (fsdp) the gradients only once, after the last micro-step
            set_grad_sync(model, micro_step == grad_accum_steps - 1)
        if objective == "dpo":  # every micro-batch holds batch_size pairs: the mean over them, as for 'lm'
            loss, sums = dpo_micro_step(model, x, y, batch[2].to(device) if batch[2] is not None else None)
            dpo_sums += sums
        else:
            with train_autocast:
                if objective == "sft":
                    pos = batch[2].to(device) if batch[2] is not None else None
                    _, loss = model(x, y, position_ids=pos)
                else:
                    _, loss = model(x, y)
        if objective == "sft":
            # mean over this micro-batch's answer tokens -> their sum / the step's count; x world_size because DDP
            # averages the ranks' gradients: the step's gradient is the mean over every answer token it holds
            loss = loss * (y != -1).sum() * world_size / step_targets
        else:
            # the loss is a mean over this micro-batch; dividing by grad_accum_steps makes the summed
            # gradients the mean over the whole batch, as if it were one big batch
            loss = loss / grad_accum_steps
        if allocator is not None:  # AdaLoRA keeps P and Q near orthonormal (PEFT adds this to its loss too)
            loss = loss + raw_model.adalora_config.orth_reg_weight * orth_regularization(raw_model) / grad_accum_steps
        loss_accum += loss.detach()
        scaler.scale(loss).backward()
    if ddp:
        dist.all_reduce(loss_accum, op=dist.ReduceOp.AVG)  # DDP/FSDP already averaged the gradients
        if dpo_sums is not None:
            dist.all_reduce(dpo_sums)
    scaler.unscale_(optimizer)
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # fsdp: the norm over all shards, replicated
    # never apply a non-finite update (with float16, the GradScaler skips a step with inf gradients by itself);
    # the gradients are all-reduced, so every rank sees the same norm and stops alike
    if not torch.isfinite(loss_accum) or (not scaler.is_enabled() and not torch.isfinite(norm)):
        stop_non_finite(f"step {step}: the loss is {loss_accum.item()} and the gradient norm {norm.item()}")
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # LoRA+ gives lora_B a multiple (lora/loraplus.py)
    scaler.step(optimizer)
    scaler.update()
    if allocator is not None:  # AdaLoRA: importance from this step's gradients, then mask to the step's budget
        allocator.update_and_allocate(raw_model, step)
    if device_type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens_per_sec = total_batch_size / dt

    if master_process:
        record.update(train_loss=loss_accum.item(), lr=lr, grad_norm=norm.item(), dt_ms=dt * 1000,
                      tok_per_s=tokens_per_sec)
        if dpo_sums is not None:  # TRL's names: rewards/chosen, rewards/accuracies, logps/rejected, ...
            record.update(dpo.metric_means(dpo_sums))
        line = (f"step {step:5d} | loss {record['train_loss']:.6f} | lr {lr:.4e} | norm {record['grad_norm']:.4f} "
                f"| dt {dt * 1000:.1f}ms | tok/s {tokens_per_sec:,.0f}")
        if peak_flops:
            record["mfu"] = flops_per_step / dt / (peak_flops * world_size)
            line += f" | mfu {100 * record['mfu']:.1f}%"
        if step % log_interval == 0 or last_step:
            print(line)
        with open(log_path, "a") as f:
            f.write(json.dumps(finite_or_none(record), allow_nan=False) + "\n")  # strict JSON: NaN -> null
        if wandb_run is not None:
            wandb_run.log(record, step=step)
    if master_process and (step == start_step + 1 or (last_step and step == start_step)):
        # after two steps: AdamW makes its moments in the first, so only the second step holds everything
        what = "max_memory_allocated" if device_type == "cuda" else "peak RSS above the process before the model"
        print(f"peak memory measured: {(peak_memory_bytes(device) - idle_memory) / 1e9:.2f} GB ({what}); "
              f"predicted {memory_estimate.peak / 1e9:.2f} GB")
    if (checkpoint_interval > 0 and (step + 1) % checkpoint_interval == 0) or last_step:
        save(step + 1)  # step + 1: the next step to run after resuming

if peft_method != "none":  # every rank: under fsdp the adapter's tensors (and for merging, all) go to rank 0
    adapter_state = None
    if sharded:
        from lora import lora_state_dict
        adapter_state = gather_state(lora_state_dict(raw_model))  # fsdp runs train LoRA only (validate.py)
    if master_process:
        if sharded:
            from lora import save_adapter
            save_adapter(raw_model, Path(out_dir) / "adapter", base_model_name_or_path=base, state=adapter_state)
        else:
            adapters.save_adapter(raw_model, Path(out_dir) / "adapter", base_model_name_or_path=base)
        print(f"adapter saved to {Path(out_dir) / 'adapter'} (PEFT format)")
    if merge_on_save and peft_method in ("lora", "adalora"):  # prompts add positions: nothing to fold into W
        whole = plain_copy(raw_model)  # rank 0: the model unsharded (itself without fsdp)
        if master_process:
            from lora import merge_and_unload
            from quant import dequantize
            whole.eval()
            x = val_loader.next_batch()[0].to(device)
            with torch.no_grad(), autocast:
                unmerged = whole(x)[0].float()
            merged = dequantize(merge_and_unload(whole))  # full precision; a quantized W is dequantized first
            with torch.no_grad(), autocast:
                error = (merged(x)[0].float() - unmerged).abs().max().item()
            merged.save_pretrained(Path(out_dir) / "merged")
            print(f"merged model saved to {Path(out_dir) / 'merged'} (Hugging Face format, full precision); largest "
                  f"|logit difference| merged vs unmerged on a val batch: {error:.2e}")
if wandb_run is not None:
    wandb_run.finish()
if ddp:
    # leave together: a rank that tears down its process group while rank 0 is still writing files can make
    # gloo abort rank 0's exit (a "terminate called" SIGABRT after all the work is done)
    dist.barrier()
    dist.destroy_process_group()
