"""One training loop for pretraining, full fine-tuning and parameter-efficient fine-tuning, on any objective.

    python train.py config/shakespeare_cpu.py                       # one process (CPU, MPS or one GPU)
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_124m_fineweb.py
    torchrun --standalone --nproc_per_node=8 train.py ... --parallel=fsdp   # shard a model too big for one GPU

Reads top to bottom: settings, distributed setup, data, model (+ adapter), optimizer, then the loop. Two tables
choose what kind of run it is, and the loop never asks: `objective` is a row of objectives.OBJECTIVES (the data,
the loss as a sum with its count, the evaluation), `peft_method` a row of adapters.METHODS (what trains, how it is
saved). Every `total_batch_size` tokens is one optimizer step, made of `grad_accum_steps` micro-batches of
batch_size x block_size tokens on each of `world_size` processes.
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------------------------
# settings: every global below can be overridden by config/*.py files and --key=value flags
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
parallel = "ddp"  # under torchrun: 'ddp' (a whole model per GPU) | 'fsdp' (each GPU holds 1/world of it: training/parallel.py)
wandb_log = False
wandb_project = "nanolora"
wandb_run_name = "run"
peft_method = "full"  # what trains, a key of adapters.METHODS: 'full' | 'lora' | 'adalora' | 'prompt' | 'ptuning' | 'prefix'
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
merge_gguf = ""  # with merge_on_save: also out_dir/merged.gguf (llama.cpp): '' | 'f32' | 'f16' | 'bf16' | 'q8_0'
quantize = ""  # '' | 'nf4' | 'int8': LoRA on a loaded base quantized while loading (QLoRA with 'nf4'), quant/quantize.py
loss_chunk_size = 1024  # tokens per chunk of the linear + cross-entropy (model/chunked_loss.py); 0 = full logits
activation_checkpointing = False  # keep only each block's input, recompute the rest in backward (~1/3 more compute)
cpu_mmap_threshold = 0  # CPU (glibc): 0 = glibc's own; N (e.g. 65536) returns freed tensors of >= N bytes to the OS:
# the resident memory then follows the live tensors, for page faults that cost a third of a step (training/memory.py)
# LoRA (lora/; also AdaLoRA's alpha, dropout and targets): every field of LoRAConfig is a setting lora_<field>
lora_r = 16
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = ("c_attn",)  # module names or .-suffixes: ('q_proj', 'v_proj'), 'q_proj,v_proj', 'all-linear' (every
#                             Linear but lm_head) or 're:<regex>' over whole names; the same in a config file and a flag
lora_mode = "split"  # 'split' | 'fused' (lora/layer.py)
lora_rslora = False  # scaling alpha / sqrt(r) instead of alpha / r
lora_modules_to_save = ()  # modules trained fully and saved with the adapter, e.g. ('ln_f',)
lora_init = "kaiming"  # 'kaiming' | 'gaussian' | 'pissa' | 'pissa_niter_K' (lora/pissa.py)
lora_use_dora = False  # DoRA: a trained magnitude per output row (lora/dora.py)
lora_loraplus_lr_ratio = 1.0  # LoRA+: lora_B's learning rate over lora_A's (lora/loraplus.py)
overwrite = False  # True: replace the run in out_dir (by default a new run refuses an out_dir holding another run)
objective = "lm"  # a key of objectives.OBJECTIVES: 'lm' (a token stream) | 'sft' (answers) | 'dpo' (preference pairs)
#                   | 'grpo' (prompts with answers: sampled completions, rewarded)
packing = True  # sft: several examples per row (block-diagonal attention) | False: one a row, padded
eval_generate_every = 0  # sft: greedy exact match on the val prompts every N steps (0 = off)
eval_generate_limit = 0  # sft: score only the first N val prompts (0 = all)
eval_generate_match = "exact"  # sft: how greedy answers are scored: 'exact' (whole answer) | 'numeric' (last number)
dpo_beta = 0.1  # dpo: the strength of the pull toward the reference (objectives/dpo.py)
dpo_loss = "sigmoid"  # dpo: 'sigmoid' (DPO) | 'ipo' | 'hinge'
dpo_label_smoothing = 0.0  # dpo, sigmoid: the chance that a label is flipped (conservative DPO)
dpo_reference = "auto"  # dpo: 'adapter_off' | 'precompute' | 'copy'; 'auto' = adapter_off where the method allows
grpo_num_generations = 8  # grpo: completions sampled per prompt, G (the group its rewards are compared within)
grpo_max_new_tokens = 64  # grpo: the longest completion; one that has not ended by then is cut (clipped_ratio)
grpo_temperature = 1.0  # grpo: sampling temperature (> 0; the log-probs are of logits / temperature, as TRL)
grpo_top_k = 0  # grpo: sample among the k likeliest tokens (0 = all)
grpo_top_p = 1.0  # grpo: nucleus sampling (1.0 = off)
grpo_epsilon = 0.2  # grpo: the clip range of the probability ratio, [1 - eps, 1 + eps]
grpo_beta = 0.04  # grpo: weight of the KL to the reference (the adapter switched off; full: a frozen copy); 0 = none
grpo_loss_type = "dapo"  # grpo: 'grpo' (per completion, then mean) | 'dapo' (per token of the step) | 'dr_grpo'
grpo_scale_rewards = True  # grpo: divide advantages by the group's reward std (False: Dr. GRPO)
grpo_reward = "numeric"  # grpo: 'exact' | 'numeric' (the last number) | 'reasoning_gym' (objectives/rewards.py)
# -----------------------------------------------------------------------------------------------
from configurator import configure  # noqa: E402
from tools.errors import UserError, report_user_errors  # noqa: E402
from training.validate import loaded_model_config, resolve_defaults, resume_config, validate_config  # noqa: E402

argv = report_user_errors(sys.argv[1:])  # user errors end the run with one line (--debug: with the traceback)
config_keys = [k for k, v in globals().items()
               if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, type(None)))]
given = configure({k: globals()[k] for k in config_keys}, argv)  # the keys set by config files and flags
config = {**{k: globals()[k] for k in config_keys}, **given}
checkpoint, resume_notes = None, []
if config["init_from"] == "resume":  # the run's settings come back from its checkpoint; some may change (training/validate.py)
    from training.checkpoint import read_checkpoint
    checkpoint = read_checkpoint(config["out_dir"])
    config, resume_notes = resume_config(checkpoint, config, given)
config = resolve_defaults(config)  # 'auto' values (dpo_reference) become what they mean, then
flags = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--")]  # the keys set on the command line
validate_config(config, given, flags)  # every value by range and meaning, and every combination, once, here
globals().update(config)  # what this run uses: logged and checkpointed
# -----------------------------------------------------------------------------------------------

import adapters  # noqa: E402
from objectives import OBJECTIVES, Run  # noqa: E402
from training.checkpoint import (fingerprint, load_base, model_from_checkpoint, rng_state, save_checkpoint,  # noqa
                                 save_merged, set_rng_state)
from training.optim import configure_adamw  # noqa: E402
from training.parallel import (all_ranks_true, gather_state, init_distributed, load_optimizer_state, local,  # noqa
                               plain_copy, set_grad_sync, wrap)
from model import model_class  # noqa: E402
from training.flops import flops_per_token, peak_for_name  # noqa: E402
from training.run_dir import claim_out_dir, finite_or_none, truncate_log  # noqa: E402
from training.memory import estimate_peak_bytes, peak_memory_bytes, set_cpu_mmap_threshold  # noqa: E402
from tokenization import load_tokenizer  # noqa: E402
from evals.in_training import hellaswag_accuracy, sample_texts  # noqa: E402

# distributed setup: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; plain `python` runs one process
ddp, ddp_rank, ddp_local_rank, world_size, device = init_distributed(device)
master_process = ddp_rank == 0  # logs, samples and checkpoints
device_type = "cuda" if device.startswith("cuda") else device
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
    raise UserError(f"dtype={dtype!r} on {device_type}: low-precision autocast is for CUDA (bf16 is ~400x "
                     f"slower on CPU); use --dtype=float32")
if device_type == "cpu" and cpu_mmap_threshold > 0:  # resident memory then follows the live tensors (training/memory.py)
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
    raise UserError(f"total_batch_size={total_batch_size} must be divisible by batch_size*block_size*world_size "
                     f"= {batch_size}*{block_size}*{world_size} = {tokens_per_micro_step}; e.g. "
                     f"--total_batch_size={max(1, total_batch_size // tokens_per_micro_step) * tokens_per_micro_step}")
grad_accum_steps = total_batch_size // tokens_per_micro_step
# out_dir is this run's: a new run refuses one that holds another run (or its own base) unless overwrite=True
out_claim = claim_out_dir(out_dir, init_from, overwrite, argv, master=master_process, lock=True, clear_later=True)
if master_process:
    print(f"total batch: {total_batch_size:,} tokens = {grad_accum_steps} micro-steps x {batch_size} x {block_size} "
          f"x {world_size} process(es){f' ({parallel})' if ddp else ''}; device {device}, dtype {dtype}")
    os.makedirs(out_dir, exist_ok=True)

# the objective's row: its data, its loss as a sum with its count, its evaluation (objectives/)
task = OBJECTIVES[objective](Run(config, device, autocast, ddp_rank, world_size, master_process))
train_loader, val_loader = task.make_loaders()

# the memory a step needs is measured against what the process holds before the model exists
if device_type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
idle_memory = peak_memory_bytes(device)

# -----------------------------------------------------------------------------------------------
# model: from scratch, resumed, or loaded (Hugging Face folder, .gguf, or our own out_dir) for fine-tuning, plus its
# adapter. base: the model this run started from (None: scratch); an adapter run's frozen base; names the tokenizer
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
else:
    if init_from == "scratch":
        model_cls = model_class(model_type)
        model = model_cls(model_cls.scratch_config(config))
    else:  # to fine-tune fully, or an adapter run's frozen base (quantized while loading for QLoRA; a LoRA out_dir:
        model = load_base(init_from, quantize=quantize, dropout=dropout)  # merged)
        base = os.path.abspath(init_from) if os.path.exists(init_from) else init_from
        config = loaded_model_config(config, given, model, init_from)  # its architecture, which flags cannot change
    # a resume refuses a base that has changed; DPO's precomputed reference is named by it
    base_fingerprint = fingerprint(model)
    # prompt_init='text' starts the prompt from these words' embeddings
    text_init = peft_method == "prompt" and prompt_init == "text"
    encode = load_tokenizer(base, model.config.vocab_size).encode if text_init else None
    # swaps target Linears for LoRA/AdaLoRA layers or attaches a prompt encoder, and freezes everything else
    adapters.apply(model, peft_method, config, encode)
method = adapters.method_of(model)  # the row of what this run trains (adapters/)
task.check(model, (train_loader, val_loader), base)  # rows past its positions, ids of another tokenizer
out_claim.clear()  # overwrite=True: the previous run's files go only now, once the model and the data have loaded
hooks = method.training_hooks(model, checkpoint)  # AdaLoRA: a loss term, and ranks pruned after each step
if method is not adapters.FULL and master_process:
    from lora import print_trainable_parameters
    print_trainable_parameters(model)
raw_model = model  # the model itself (sharded in place under fsdp): checkpoints, sampling and the optimizer use it
# fsdp shards after the adapter (and activation checkpointing) changed the modules, before the optimizer sees them
if sharded:  # shard on the CPU: each rank moves only its 1/world_size of the weights to its device
    wrap(model, "fsdp", device_type, ddp_local_rank, param_dtype=torch.bfloat16 if dtype == "bfloat16" else None)
model.to(device)
raw_model.loss_chunk_size, raw_model.activation_checkpointing = loss_chunk_size, activation_checkpointing
if compile:
    model = torch.compile(model)
if ddp and not sharded:
    model = wrap(model, "ddp", device_type, ddp_local_rank)
eval_model = getattr(model, "module", model)  # ranks may hold different numbers of val batches: no DDP forward
task.start(raw_model, base=base, base_fingerprint=base_fingerprint, resuming=init_from == "resume",
           loaders=(train_loader, val_loader), out_dir=out_dir)  # e.g. DPO's reference

optimizer = configure_adamw(raw_model, weight_decay, max_lr, (beta1, beta2), device_type, verbose=master_process)
# from here on each rank draws its own dropout masks (nanoGPT's seed_offset): with one seed everywhere, every rank
# would drop the same positions of its micro-batch
torch.manual_seed(seed + ddp_rank)
if checkpoint is not None:  # the optimizer's moments and every rank's RNG stream continue where they stopped
    load_optimizer_state(raw_model, optimizer, checkpoint["optimizer"])  # the same file from one process, ddp or fsdp
    set_rng_state(checkpoint["rng"], ddp_rank, device, world_size, master_process)
    checkpoint = None  # free the memory
memory_estimate = estimate_peak_bytes(raw_model, batch_size * task.rows_per_item, block_size,
                                      loss_chunk_size=0 if task.full_logits else None,
                                      act_bytes=4 if dtype == "float32" else 2, device=device)
if master_process:
    print(f"memory model, peak of a training step: {memory_estimate.summary()}")

# the tokenizer of the model (tokenization/): for samples, and for HellaSwag, which cannot run without it
try:
    tokenizer = load_tokenizer(base, raw_model.config.vocab_size)
except (ValueError, FileNotFoundError, ImportError) as e:
    if hellaswag_every > 0 or merge_gguf:  # merged.gguf holds the tokenizer
        raise
    tokenizer = None
    if master_process and sample_interval > 0:
        print(f"no samples: {e}")
if merge_gguf:  # what the GGUF export would refuse at the end of the run (architecture, tokenizer), refused now
    from formats.gguf_export import check_exportable
    check_exportable(raw_model, tokenizer)
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
                    base_fingerprint, extra=hooks.state_dict() if hooks is not None else None)
    saved_step = step


# -----------------------------------------------------------------------------------------------
# the loop
for step in range(start_step, max_steps):
    last_step = step == max_steps - 1
    record = {"step": step}
    if eval_interval > 0 and (step % eval_interval == 0 or last_step):
        record.update(task.evaluate(eval_model, val_loader))
        if master_process:
            print(f"step {step}: {task.describe(record)}")
    if hellaswag_every > 0 and (step % hellaswag_every == 0 or last_step):
        result = hellaswag_accuracy(raw_model, tokenizer, device, ddp_rank, world_size, hellaswag_limit,
                                    amp=dtype != "float32")
        record["hellaswag_acc"], record["hellaswag_acc_norm"] = result["acc"], result["acc_norm"]
        if master_process:
            print(f"step {step}: hellaswag acc_norm {record['hellaswag_acc_norm']:.4f}")
    record.update(task.extra_evaluations(raw_model, step, last_step))  # e.g. SFT's exact match, on its own interval
    if sampling and step > 0 and (step % sample_interval == 0 or last_step):
        texts = sample_texts(raw_model, tokenizer, sample_prompt, num_samples, sample_tokens, seed + step, device,
                             autocast)
        for i, text in enumerate(texts if master_process else []):
            print(f"sample {i}: {text!r}")

    t0 = time.perf_counter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    # (x, y, ...): what the objective's loader yields, made ready by its row (GRPO: completions sampled, rewarded)
    batches = [task.prepare(raw_model, tuple(t.to(device) if t is not None else None for t in train_loader.next_batch()))
               for _ in range(grad_accum_steps)]
    # the step's gradient is the mean over every item (target token, pair) of the step, on all ranks: each
    # micro-batch's summed loss is divided by the step's count, x world_size because DDP averages the ranks' gradients
    step_count = sum(task.count(b) for b in batches).float()
    if ddp:
        dist.all_reduce(step_count)
    loss_accum, metric_sums = torch.zeros((), device=device), None
    for micro_step, batch in enumerate(batches):
        if ddp:
            # all-reduce (ddp) or reduce-scatter (fsdp) the gradients only once, after the last micro-step
            set_grad_sync(model, micro_step == grad_accum_steps - 1)
        with train_autocast:
            loss_sum, sums = task.loss(model, batch)
        loss = loss_sum * world_size / step_count
        if hooks is not None:  # a method's own term (AdaLoRA keeps P and Q near orthonormal)
            loss = loss + hooks.loss(raw_model) / grad_accum_steps
        loss_accum += loss.detach()
        if sums is not None:
            metric_sums = sums if metric_sums is None else metric_sums + sums
        scaler.scale(loss).backward()
    if ddp:
        dist.all_reduce(loss_accum, op=dist.ReduceOp.AVG)  # DDP/FSDP already averaged the gradients
        if metric_sums is not None:
            dist.all_reduce(metric_sums)
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
    if hooks is not None:  # AdaLoRA: importance from this step's gradients, then mask to the step's budget
        hooks.after_step(raw_model, step)
    if device_type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens_per_sec = total_batch_size / dt

    if master_process:
        record.update(train_loss=loss_accum.item(), lr=lr, grad_norm=norm.item(), dt_ms=dt * 1000,
                      tok_per_s=tokens_per_sec)
        if metric_sums is not None:  # the objective's own, e.g. DPO's rewards/chosen, rewards/accuracies, ...
            record.update(task.metrics(metric_sums))
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

# -----------------------------------------------------------------------------------------------
# the adapter in PEFT's format, and with merge_on_save the merged model (every rank: fsdp gathers to rank 0)
if method is not adapters.FULL:
    state = gather_state(method.state_dict(raw_model, raw_model.state_dict())) if sharded else None
    if master_process:
        method.save(raw_model, Path(out_dir) / "adapter", base_model_name_or_path=base, state=state)
        print(f"adapter saved to {Path(out_dir) / 'adapter'} (PEFT format)")
if merge_on_save:  # the settings check allows it only for methods that fold into the weights
    whole = plain_copy(raw_model)  # rank 0: the model unsharded (itself without fsdp)
    if master_process:  # out_dir/merged (Hugging Face), and with merge_gguf out_dir/merged.gguf (llama.cpp)
        save_merged(whole, out_dir, val_loader.next_batch()[0].to(device), autocast, tokenizer, merge_gguf)
if wandb_run is not None:
    wandb_run.finish()
if ddp:
    # leave together: a rank that tears down its process group while rank 0 is still writing files can make
    # gloo abort rank 0's exit (a "terminate called" SIGABRT after all the work is done)
    dist.barrier()
    dist.destroy_process_group()
out_claim.release()  # the next run may start into out_dir
