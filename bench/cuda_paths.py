"""The checks of bench/cuda_check.py: every path that only a CUDA GPU exercises, one function each.

Each check is fn(ctx, measured): ctx names the device, the compute dtypes, the sizes and the compile backend
(cuda_context: one GPU at training sizes; the tests run the same functions on the CPU in fp32 at TINY sizes); the
check fills `measured` with what it measured and raises AssertionError when a number is out of its tolerance.

  lora_bf16, dora_bf16  LoRALinear split and fused (FusedLoRALinear's own backward), and DoRA (lora/dora.py) split
                and fused, under bf16 autocast: y and the gradients of x, A, B (DoRA: m) against float64, relative
                error ||g - g_ref|| / ||g_ref|| <= 2e-2 (bf16 keeps 8 significant bits, unit roundoff 2^-8 = 3.9e-3,
                and the GEMMs sum in fp32); output bf16, parameter gradients fp32
  compile       torch.compile (Inductor) of a LoRA GPT (split and fused layers) as train.py: 3 AdamW steps' losses
                within 2e-2 of eager's
  fused_adamw   training/optim.py's configure_adamw picks fused=True on CUDA: 10 steps equal torch's for-loop AdamW
  sdpa_packed   the SDPA kernels (from the profiler) of packed_causal_mask and of plain causal attention; packed loss
                and LoRA gradients within 2e-2 / 4e-2 of the math kernel's (sdpa_kernel(SDPBackend.MATH))
  fsdp          FSDP2 as train.py shards (training/parallel.py's wrap: fully_shard, bf16 params, fp32 reduce, no
                autocast) on nccl, world size 1, against the unsharded step under bf16 autocast: losses within 2e-2,
                first LoRA gradients within 1e-1 (FSDP runs every op in bf16, autocast keeps norms in fp32)
  fp16          train.py's dtype='float16' step (fp16 autocast; GradScaler scale, unscale_, clip, step, update) on a
                fixed batch: finite losses, falling, fewer than half the steps skipped
  mfu           a GPT-2 124M LoRA step (r=16 on every block Linear, B=16, T=1024, bf16, compiled): tokens/s and MFU
                (training/flops.py's FLOPs over the GPU's dense bf16 peak), which must lie in (0, 1)
"""
import copy
import functools
import math
import socket
import time
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.nn as nn

from bench import common

# relative error allowed against a float64 (layers) or fp32/eager (models) reference, by compute dtype
TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-4}
# sizes: a layer (in, out, r, B, T); a model (n_layer, n_head, n_embd, vocab, B, T); MFU's GPT-2 and its steps
GPU = dict(layer=(768, 2304, 16, 8, 1024), model=(2, 12, 768, 50304, 4, 256), gpt2=(12, 12, 768, 50304, 16, 1024),
           mfu_steps=10, fp16_steps=30)
TINY = dict(layer=(32, 48, 4, 2, 8), model=(2, 2, 32, 128, 2, 16), gpt2=(2, 2, 32, 128, 2, 16), mfu_steps=2,
            fp16_steps=12)


def cuda_context(device="cuda"):
    return dict(device=device, amp=torch.bfloat16, half=torch.float16, backend="inductor", size=GPU)


# ---- helpers ------------------------------------------------------------------------------------------------------

def require(ok, message):
    if not ok:
        raise AssertionError(message)


def rel_err(a, ref):
    """||a - ref|| / ||ref|| in float64."""
    a, ref = a.detach().double(), ref.detach().double().to(a.device)
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def autocast(ctx, dtype):
    return torch.autocast(ctx["device"].split(":")[0], dtype=dtype) if dtype != torch.float32 else nullcontext()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def lora_gpt(ctx, shape=None, r=8, fused=True, device=None):
    """A seeded GPT with LoRA on every block Linear (B random, so A has a gradient too); layer 0 split, the others
    fused when `fused`. Built on the CPU and moved to `device` (default the context's)."""
    from lora import LoRAConfig, apply_lora, lora_layers
    from model import GPT, GPTConfig
    n_layer, n_head, n_embd, vocab, _, T = shape or ctx["size"]["model"]
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=T, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd))
    apply_lora(model, LoRAConfig(r=r, alpha=16, targets=("c_attn", "c_proj", "c_fc")))
    for name, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.02)
        if fused and not name.startswith("transformer.h.0."):
            layer.set_mode("fused")
    return model.to(device or ctx["device"])


def batch(ctx, shape=None, seed=1):
    _, _, _, vocab, B, T = shape or ctx["size"]["model"]
    seq = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(seed)).to(ctx["device"])
    return seq[:, :-1], seq[:, 1:]


def adamw(model, ctx):
    from training.optim import configure_adamw
    return configure_adamw(model, 0.1, 1e-3, (0.9, 0.95), ctx["device"].split(":")[0], verbose=False)


def train(model, ctx, amp=True, params=None, steps=3, first_grads=None):
    """The losses of `steps` AdamW steps on batches seeded 0, 1, ... (params: the module that owns the parameters,
    for a compiled model); first_grads (a dict) receives the first step's LoRA gradients."""
    opt, losses = adamw(params or model, ctx), []
    for step in range(steps):
        x, y = batch(ctx, seed=step)
        with autocast(ctx, ctx["amp"] if amp else torch.float32):
            _, loss = model(x, y)
        loss.backward()
        if step == 0 and first_grads is not None:
            first_grads.update(lora_grads(model))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def lora_grads(model):
    """{name: gradient} of the LoRA parameters, whole (an FSDP DTensor gathered)."""
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach()
            for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def grads_rel_err(grads, ref):
    require(grads.keys() == ref.keys() and grads, f"gradients of {sorted(set(grads) ^ set(ref))} missing")
    return max(rel_err(grads[n], ref[n]) for n in ref)


def losses_rel_err(losses, ref):
    return max(abs(a - b) / abs(b) for a, b in zip(losses, ref))


def fmt_losses(losses):
    return " ".join(f"{v:.4f}" for v in losses)


# ---- the checks: each fills `m` with what it measured and raises AssertionError when a number is wrong -----------

def check_layer(ctx, m, dora, modes=("split", "fused")):
    """LoRALinear (or DoRA) under autocast(ctx['amp']) against the same formula in float64."""
    from lora.dora import add_magnitude
    from lora.layer import LoRALinear
    d_in, d_out, r, B, T = ctx["size"]["layer"]
    amp, tol = ctx["amp"], TOL[ctx["amp"]]
    for mode in modes:
        torch.manual_seed(0)
        layer = LoRALinear(nn.Linear(d_in, d_out), r=r, alpha=2 * r, mode=mode).to(ctx["device"])
        nn.init.normal_(layer.lora_B, std=0.02)
        if dora:
            add_magnitude(layer)
            with torch.no_grad():
                layer.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn_like(layer.lora_magnitude_vector))
        x = torch.randn(B, T, d_in, device=ctx["device"], requires_grad=True)
        dy = torch.randn(B, T, d_out, device=ctx["device"])
        with autocast(ctx, amp):
            y = layer(x)
        require(y.dtype == amp, f"{mode}: output dtype {y.dtype} under autocast({amp})")
        y.backward(dy.to(y.dtype))
        params = {"A": layer.lora_A, "B": layer.lora_B, **({"m": layer.lora_magnitude_vector} if dora else {})}
        require(all(p.grad.dtype == torch.float32 for p in params.values()), f"{mode}: parameters' gradients not fp32")
        # the reference: y = g * (x V^T) + b, V = W + s B A, g = m / ||V|| (detached), g = 1 without DoRA
        ref = {k: p.detach().double().requires_grad_() for k, p in params.items()}
        x64 = x.detach().double().requires_grad_()
        V = layer.weight.double() + layer.scaling * ref["B"] @ ref["A"]
        g = ref["m"] / V.detach().norm(dim=1) if dora else 1.0
        y64 = g * (x64 @ V.t()) + layer.bias.double()
        y64.backward(dy.double())
        errors = {"y": rel_err(y, y64), "dx": rel_err(x.grad, x64.grad),
                  **{f"d{k}": rel_err(params[k].grad, ref[k].grad) for k in params}}
        m.update({f"{mode} {k}": v for k, v in errors.items()})
        worst = max(errors, key=errors.get)
        require(errors[worst] <= tol, f"{mode}: {worst} relative error {errors[worst]:.3g} > {tol:g}")


def check_compile(ctx, m):
    """The LoRA GPT compiled (as train.py: torch.compile(model)) trains 3 steps with eager's losses."""
    torch._dynamo.reset()
    eager = lora_gpt(ctx)
    plain = copy.deepcopy(eager)
    eager_losses, t0 = train(eager, ctx), time.perf_counter()
    compiled = train(torch.compile(plain, backend=ctx["backend"]), ctx, params=plain)
    m.update({"compiled 3 steps s (compiling included)": time.perf_counter() - t0,
              "eager losses": fmt_losses(eager_losses), "compiled losses": fmt_losses(compiled)})
    m["max rel diff"] = err = losses_rel_err(compiled, eager_losses)
    require(err <= TOL[ctx["amp"]], f"compiled losses differ from eager's by {err:.3g} > {TOL[ctx['amp']]:g}")


def check_fused_adamw(ctx, m):
    """configure_adamw's optimizer (fused on CUDA) against torch's for-loop AdamW on a copy of the same model."""
    model = lora_gpt(ctx)
    reference = copy.deepcopy(model)
    opt = adamw(model, ctx)
    m["fused"] = opt.defaults.get("fused")
    require(m["fused"] is True, f"configure_adamw gave fused={m['fused']}")
    name_of, ref_params = {id(p): n for n, p in model.named_parameters()}, dict(reference.named_parameters())
    groups = [dict(params=[ref_params[name_of[id(p)]] for p in g["params"]], lr=g["lr"], weight_decay=g["weight_decay"])
              for g in opt.param_groups]
    ref_opt = torch.optim.AdamW(groups, betas=opt.defaults["betas"], eps=opt.defaults["eps"], foreach=False,
                                fused=False)
    x, y = batch(ctx)
    for _ in range(10):
        for mod, o in ((model, opt), (reference, ref_opt)):
            mod(x, y)[1].backward()
            o.step()
            o.zero_grad(set_to_none=True)
    m["max rel diff after 10 steps"] = err = max(rel_err(p, ref_params[n]) for n, p in model.named_parameters()
                                                 if p.requires_grad)
    require(err <= 1e-5, f"fused AdamW's parameters differ from for-loop AdamW's by {err:.3g}")


def sdpa_ops(fn):
    """The SDPA backend ops (aten::_scaled_dot_product_*, _flash_attention, ..., forward and backward) fn() runs."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    prefixes = ("aten::_scaled_dot_product", "aten::_efficient_attention", "aten::_flash_attention",
                "aten::_cudnn_attention")
    return " ".join(sorted({e.key.removeprefix("aten::") for e in prof.key_averages() if e.key.startswith(prefixes)}))


def check_sdpa_packed(ctx, m):
    """Which kernel runs the packed (block-diagonal) mask and plain causal attention; the packed loss and LoRA
    gradients equal the math kernel's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = lora_gpt(ctx)
    x, y = batch(ctx)
    g = torch.Generator().manual_seed(3)
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in doc_lengths(x.size(1), g)])
                                for _ in range(x.size(0))]).to(ctx["device"])
    result = {}

    def step(key, **kw):
        model.zero_grad(set_to_none=True)
        with autocast(ctx, ctx["amp"]):
            _, loss = model(x, y, **kw)
        loss.backward()
        result[key] = (loss.detach().float(), lora_grads(model))

    m["packed kernel"] = sdpa_ops(lambda: step("packed", position_ids=position_ids))
    m["causal kernel"] = sdpa_ops(lambda: step("causal"))
    with sdpa_kernel(SDPBackend.MATH):
        step("math", position_ids=position_ids)
    m["loss rel diff vs math"] = loss_err = rel_err(result["packed"][0], result["math"][0])
    m["LoRA grad rel diff vs math"] = grad_err = grads_rel_err(result["packed"][1], result["math"][1])
    tol = TOL[ctx["amp"]]
    require(loss_err <= tol and grad_err <= 2 * tol, f"packed SDPA vs math kernel: loss {loss_err:.3g}, gradients "
                                                     f"{grad_err:.3g} (tolerance {tol:g}, {2 * tol:g})")


def doc_lengths(T, g):
    """Random document lengths (>= 2 but for a last one of 1) filling a row of T tokens."""
    lengths = []
    while sum(lengths) < T:
        lengths.append(min(T - sum(lengths), int(torch.randint(2, max(3, T // 2), (1,), generator=g))))
    return lengths


def check_fsdp(ctx, m):
    """train.py's FSDP2 step (wrap(..., 'fsdp'), bf16 params, fp32 reduce, no autocast) on a world of one process
    against its plain step (bf16 autocast): 3 steps' losses and the first step's LoRA gradients."""
    import torch.distributed as dist
    from training.parallel import wrap
    device, cuda = ctx["device"], ctx["device"].startswith("cuda")
    started = not dist.is_initialized()
    if started:
        with socket.socket() as s:  # a free port for the one-process group's rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1, timeout=timedelta(minutes=2))
    try:
        m["backend"] = dist.get_backend()
        plain_grads, fsdp_grads = {}, {}
        plain = train(lora_gpt(ctx), ctx, first_grads=plain_grads)
        sharded = lora_gpt(ctx, device="cpu")  # as train.py: shard on the CPU, then move
        wrap(sharded, "fsdp", device.split(":")[0], 0, param_dtype=ctx["amp"] if ctx["amp"] == torch.bfloat16 else None)
        fsdp = train(sharded.to(device), ctx, amp=False, first_grads=fsdp_grads)
        m.update({"plain losses": fmt_losses(plain), "fsdp losses": fmt_losses(fsdp)})
        m["loss rel diff"] = loss_err = losses_rel_err(fsdp, plain)
        m["LoRA grad rel diff"] = grad_err = grads_rel_err(fsdp_grads, plain_grads)
        tol = TOL[ctx["amp"]]
        require(loss_err <= tol and grad_err <= 5 * tol, f"FSDP vs plain step: losses {loss_err:.3g}, gradients "
                                                         f"{grad_err:.3g} (tolerance {tol:g}, {5 * tol:g})")
    finally:
        if started:
            dist.destroy_process_group()


def check_fp16(ctx, m):
    """train.py's float16 step on one fixed batch: losses finite, and lower at the end than at the start."""
    device_type, half, steps = ctx["device"].split(":")[0], ctx["half"], ctx["size"]["fp16_steps"]
    model = lora_gpt(ctx)
    opt = adamw(model, ctx)
    for group in opt.param_groups:
        group["lr"] = 3e-3
    scaler = torch.amp.GradScaler(device_type, enabled=half == torch.float16)
    x, y = batch(ctx)
    losses, skipped = [], 0
    for _ in range(steps):  # train.py's step, with its order of scale, unscale_, clip, step, update
        with autocast(ctx, half):
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        scale = scaler.get_scale() if scaler.is_enabled() else 1.0
        scaler.step(opt)
        scaler.update()
        skipped += scaler.is_enabled() and scaler.get_scale() < scale  # the scale drops when a step was skipped
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    first, last = losses[0], sum(losses[-5:]) / 5
    m.update({"first loss": first, "mean of last 5": last, "skipped steps": skipped,
              "final scale": scaler.get_scale() if scaler.is_enabled() else "-"})
    require(all(math.isfinite(v) for v in losses), f"non-finite losses: {losses}")
    require(last < first - 0.05, f"loss did not decrease: {first:.4f} -> {last:.4f}")
    require(skipped < steps // 2, f"{skipped} of {steps} steps skipped (inf/nan gradients)")


def check_mfu(ctx, m):
    """A GPT-2 124M LoRA step (r=16 on every block Linear, B=16, T=1024, bf16 autocast, compiled as train.py)."""
    from training.flops import flops_per_token, peak_for_name
    shape, device, steps = ctx["size"]["gpt2"], ctx["device"], ctx["size"]["mfu_steps"]
    n_layer, _, n_embd, _, B, T = shape
    raw = lora_gpt(ctx, shape, r=16, fused=False)
    if ctx["backend"]:  # None: eager
        torch._dynamo.reset()
    model = torch.compile(raw, backend=ctx["backend"]) if ctx["backend"] else raw
    opt = adamw(raw, ctx)
    x, y = batch(ctx, shape)

    def step():
        with autocast(ctx, ctx["amp"]):
            _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):  # compile and warm up
        step()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync(device)
    dt = (time.perf_counter() - t0) / steps
    flops = flops_per_token(raw, T, n_layer, n_embd) * B * T / dt
    peak = peak_for_name(torch.cuda.get_device_name(device)) if device.startswith("cuda") else None
    mfu = flops / peak if peak and ctx["amp"] != torch.float32 else None
    m.update({"step ms": dt * 1e3, "tok/s": B * T / dt, "FLOP/s": common.si(flops, "FLOP/s"),
              "MFU": "-" if mfu is None else f"{100 * mfu:.1f}%", "loss": loss.item()})
    if device.startswith("cuda"):
        m["peak GB"] = torch.cuda.max_memory_allocated(device) / 1e9
    require(math.isfinite(loss.item()), f"loss {loss.item()}")
    require(mfu is None or 0 < mfu < 1, f"MFU {mfu} outside (0, 1): the FLOP count or the peak is wrong")


CHECKS = {"lora_bf16": functools.partial(check_layer, dora=False),
          "dora_bf16": functools.partial(check_layer, dora=True), "compile": check_compile,
          "fused_adamw": check_fused_adamw, "sdpa_packed": check_sdpa_packed, "fsdp": check_fsdp, "fp16": check_fp16,
          "mfu": check_mfu}
