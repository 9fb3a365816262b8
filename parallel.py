"""How train.py spreads one model over processes: DDP (a whole copy on every rank) or FSDP2 (a shard on every rank).

DDP: every rank holds all weights, gradients and optimizer states; after backward the gradients are all-reduced
(averaged), and every rank takes the same optimizer step. Simple and fast, but a rank needs the whole model.

FSDP2 (`torch.distributed.fsdp.fully_shard`): every parameter is cut into world_size row shards (a DTensor); a rank
keeps only its shard of the weights, of their gradients and of the AdamW states. Just before a block's forward (and
again before its backward) its parameters are all-gathered, used, and freed; after its backward the gradients are
reduce-scattered, so each rank ends with the averaged gradient of its own shard and updates only that. Sharding is
per parameter, so a frozen LoRA base and trainable lora_A/lora_B tensors sit side by side in one block.

Memory per rank, fp32 weights and AdamW (P parameters, of which P_t are trained, W ranks, G = the largest block):
    DDP    4 P + 4 P_t + 8 P_t                        (weights, gradients, Adam m and v)
    FSDP   (4 P + 4 P_t + 8 P_t) / W + 4 G            (+ one block gathered at a time, two with prefetching)
e.g. LLaMA-7B full fine-tuning, 16 bytes x 6.7B = 107 GB: no single 80 GB GPU holds it under DDP; under FSDP on 8
GPUs each holds 13.4 GB plus a 0.8 GB block. A LoRA run trains ~0.1% of P: 4 P dominates, 27 GB under DDP on every
rank, 3.4 GB a rank under FSDP on 8.

Checkpoints are written in one format for both: the full state dict gathered to rank 0 (the model's tensors and
the optimizer state keyed by parameter name), so a DDP checkpoint resumes under FSDP and the reverse.
"""
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP

PARALLEL = ("ddp", "fsdp")
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered to rank 0, on the CPU


def blocks(model):
    """The transformer blocks: each becomes one FSDP unit (gathered and freed as a whole)."""
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def wrap(model, parallel, device_type, local_rank, param_dtype=None):
    """Shard (fsdp) or replicate (ddp) `model` across the process group; returns the module to train.

    fsdp shards `model` in place: its parameters become DTensor shards. param_dtype (CUDA: torch.bfloat16) makes
    FSDP gather the weights in that dtype for compute and reduce gradients in fp32: it replaces autocast.
    """
    if parallel == "ddp":
        return DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mp_policy": policy} if policy else {}
    for block in blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)  # the rest: embeddings, final norm, lm_head (tied to the embedding in GPT-2)
    return model


def set_grad_sync(model, sync):
    """Communicate gradients only on the last micro-step of an accumulation (all-reduce or reduce-scatter)."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = sync
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP module
        model.set_requires_gradient_sync(sync)


def is_sharded(model):
    return hasattr(model, "set_requires_gradient_sync")


def full_state(model, optimizer=None):
    """(model state dict, optimizer state dict) gathered to rank 0 on the CPU (other ranks get empty dicts).

    Every rank must call it (FSDP all-gathers). Works for a plain or DDP'd module too, so both formats agree:
    the optimizer state is keyed by parameter names, not by position.
    """
    model_sd = get_model_state_dict(model, options=FULL) if is_sharded(model) else model.state_dict()
    optim_sd = get_optimizer_state_dict(model, optimizer, options=FULL) if optimizer is not None else None
    if is_sharded(model) and dist.get_rank() != 0:
        return {}, {}
    return model_sd, optim_sd


def load_optimizer_state(model, optimizer, optim_sd):
    """Load a name-keyed full optimizer state (from full_state) into a plain or sharded model's optimizer."""
    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))


def local_numel(model):
    """Parameter elements this rank holds (its shards under fsdp, everything under ddp)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
