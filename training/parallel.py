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
e.g. LLaMA-7B full fine-tuning, 16 bytes x 6.74B = 108 GB: no single 80 GB GPU holds it under DDP; under FSDP on
8 GPUs each holds 13.5 GB plus a 0.8 GB block (0.4 GB gathered in bf16). A LoRA run (r=16 on q/k/v/o) trains 0.25%
of P: 4 P dominates, 27 GB under DDP on every rank, 3.4 GB a rank under FSDP on 8.

Checkpoints are written in one format for both: the full state dict gathered to rank 0 (the model's tensors and
the optimizer state keyed by parameter name), so a DDP checkpoint resumes under FSDP and the reverse.
"""
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
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
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kwargs = {"mesh": init_device_mesh(device_type, (dist.get_world_size(),))}  # 1-D: every rank holds a shard
    if param_dtype:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)  # the rest: embeddings, final norm, lm_head (tied to the embedding in GPT-2)
    return model


def set_grad_sync(model, sync):
    """Communicate gradients only on the last micro-step of an accumulation (all-reduce or reduce-scatter)."""
    model = getattr(model, "_orig_mod", model)  # under torch.compile: the module it compiled
    if isinstance(model, DDP):
        model.require_backward_grad_sync = sync
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP module
        model.set_requires_gradient_sync(sync)


def is_sharded(model):
    return hasattr(model, "set_requires_gradient_sync")


def is_rank0():
    return not dist.is_initialized() or dist.get_rank() == 0


def local(t):
    """This rank's part of a tensor: its shard of an FSDP DTensor, the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def all_ranks_true(flag, device):
    """True when `flag` holds on every rank (under FSDP each rank checks only its own shards)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor(int(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_state(state):
    """{name: tensor} with every FSDP shard gathered: whole CPU tensors on rank 0, {} on the other ranks.

    Every rank must call it under FSDP (each gather is a collective). Filter first (e.g. lora_state_dict), gather
    after: a LoRA run then moves only its adapter, never the frozen base. A tensor under two names (GPT-2's tied
    wte/lm_head) is gathered once and stays one tensor."""
    out, done = {}, {}
    for name, t in state.items():
        if id(t) not in done:
            whole = t.full_tensor() if isinstance(t, DTensor) else t
            done[id(t)] = whole.detach().cpu() if is_rank0() else None
        if is_rank0():
            out[name] = done[id(t)]
    return out


def optimizer_state(model, optimizer):
    """The optimizer state keyed by parameter names, gathered to rank 0 on the CPU ({} on the other ranks).

    `model` is the plain or FSDP-sharded module (not a DDP wrapper). Names, not positions: the same file for one
    process, DDP and FSDP. Every rank must call it under FSDP (torch gathers the shards of m and v)."""
    if is_sharded(model):
        return get_optimizer_state_dict(model, optimizer, options=FULL)
    return by_name(model, optimizer, optimizer.state_dict()) if is_rank0() else {}


def by_name(model, optimizer, optim_sd):
    """optimizer.state_dict() keys its parameters by position in the optimizer's groups: key them by name."""
    name_of = {id(p): n for n, p in model.named_parameters()}  # a tied weight: its first name
    names = [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]  # position -> name
    return {"state": {names[i]: s for i, s in optim_sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim_sd["param_groups"]]}


def load_optimizer_state(model, optimizer, optim_sd):
    """Load a name-keyed full optimizer state (from optimizer_state) into a plain or sharded model's optimizer.

    Every rank passes the whole state; FSDP keeps each rank's shard of it. An older checkpoint's state keyed by
    position (optimizer.state_dict()) is renamed first: the positions are configure_optimizers' parameter order."""
    if any(isinstance(k, int) for g in optim_sd["param_groups"] for k in g["params"]):
        optim_sd = by_name(model, optimizer, optim_sd)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=StateDictOptions(full_state_dict=True))


def plain_copy(model):
    """An unsharded copy of an FSDP model on rank 0's CPU, with its LoRA layers (None on the other ranks); the model
    itself when it is not sharded. For what needs whole weights in one place: merge_on_save's merged export.
    Every rank must call it under FSDP."""
    if not is_sharded(model):
        return model
    state = gather_state(model.state_dict())
    if not is_rank0():
        return None
    from model import build_model
    copy = build_model(model.model_type, model.config_dict())  # the registry: the same class and config
    quantize_like(copy, model)
    if getattr(model, "lora_config", None) is not None:
        from lora import apply_lora
        apply_lora(copy, model.lora_config)
    copy.load_state_dict(state)
    return copy


def quantize_like(copy, model):
    """Quantize the Linear layers of `copy` (a plain model) that are quantized in `model`, with the same method, so
    that model's state dict (packed codes and scales) loads into it."""
    import torch.nn as nn

    from quant import QUANTIZERS, quantize
    kinds = {name: kind for name, m in model.named_modules() for kind, cls in QUANTIZERS.items()
             if isinstance(getattr(m, "weight", None), cls)}  # a LoRA layer over a quantized base holds its weight
    for kind in set(kinds.values()):
        others = tuple(n for n, m in copy.named_modules() if isinstance(m, nn.Linear) and kinds.get(n) != kind)
        quantize(copy, kind, skip=others)
    return copy


def local_numel(model):
    """Parameter elements this rank holds (its shards under fsdp, everything under ddp)."""
    return sum(local(p).numel() for p in model.parameters())


def init_distributed(device="auto"):
    """(ddp, rank, local_rank, world_size, device). Under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE) the
    process group starts, nccl on CUDA and gloo elsewhere, each rank on its own GPU; a plain `python` is one process.
    device='auto' picks CUDA (this rank's GPU), then MPS (one process only), then the CPU."""
    import os
    if "RANK" not in os.environ:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        return False, 0, 0, 1, device
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return True, rank, local_rank, world_size, device
