"""DoRA (Liu et al., 2024): LoRA that learns each output row's length and direction apart.

    V  = W + s B A                        (out, in)  the LoRA-updated weight, the "direction"
    W' = m * V / ||V||                    ||V||: one L2 norm per output row (out,);  m: trainable (out,)
    y  = x W'^T + b = g * (x V^T) + b     with g = m / ||V||  (out,), one scale per output feature

m starts as ||W + s B A|| (= ||W|| for a fresh adapter, B = 0), so g = 1 and the layer starts as the base layer.
As the paper recommends (section 4.3) and PEFT does, ||V|| is treated as a constant (detached): it follows B and A
but passes no gradient back, so dA and dB are LoRA's gradients scaled by g, and dm_j = sum_n dy_nj z_nj / ||V_j||
with z = x V^T. Turn it on with LoRAConfig(use_dora=True); PEFT's files call m `lora_magnitude_vector`.

Cost: the norm needs V itself, an (out, in) temporary, in every forward (both modes). Since V exists anyway, the
fused mode uses it for the one big GEMM (z = x V^T) instead of split's three GEMMs. Neither mode ever forms a
weight-sized gradient; the price of the trainable m is one saved (N, out) activation, z (see DoRAFunction).
With lora dropout (split mode, training) we follow PEFT exactly: y = x W^T + b - xd W^T + g * (xd V^T), xd the
dropped-out input: the base term sees x, the DoRA-scaled term xd.

On a quantized base (QLoRA + DoRA; PEFT allows DoRA on 4-bit bases too) W is the dequantized weight, dense(W):
m = ||deq(W) + s B A||, and the layer computes exactly what DoRA on those dequantized fp32 weights computes. The
packed W is dequantized where V is needed (forward; the fused backward again) and never kept in full precision.
effective_weight(layer) = g * V, with its graph to m, A and B, is the one weight a DoRA lm_head hands the chunked
loss (model/lm.py).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from quant.quantize import dense, frozen_linear
from tools.errors import UserError


def updated_weight(layer) -> torch.Tensor:
    """V = W + s B A (out, in), in the weight's dtype with autocast off (the norm wants full precision)."""
    with torch.autocast(layer.lora_A.device.type, enabled=False):
        W = dense(layer.weight)  # a quantized W dequantized
        return torch.addmm(W, layer.lora_B.to(W.dtype), layer.lora_A.to(W.dtype), alpha=layer.scaling)


def row_norm(layer) -> torch.Tensor:
    """||W + s B A|| per output row (out,), detached: DoRA's norm passes no gradient."""
    with torch.no_grad():
        return torch.linalg.norm(updated_weight(layer), dim=1)


def add_magnitude(layer):
    """Give a LoRALinear its trainable magnitude m = ||W + s B A|| (out,): the layer becomes a DoRA layer."""
    if layer.weight_is_tied:
        raise UserError("DoRA on a weight tied to another module is not supported (the norm is per output row of "
                         "this layer's own weight); leave the tied layer out of the targets")
    layer.lora_magnitude_vector = nn.Parameter(row_norm(layer).to(layer.lora_A.dtype))
    return layer


def effective_weight(layer) -> torch.Tensor:
    """W' = g * V (out, in), g = m / ||V||, differentiable in m, A and B with the norm held constant, as in forward:
    x W'^T + b is the layer's output without dropout (split and fused alike). dm_j = sum_i dW'_ji V_ji / ||V_j||
    = sum_n dy_nj z_nj / ||V_j||, and dV = g dW': DoRAFunction's gradients, through autograd."""
    V = updated_weight(layer)  # (out, in)
    g = layer.lora_magnitude_vector / torch.linalg.norm(V.detach(), dim=1)  # (out,)
    return g.to(V.dtype)[:, None] * V


def forward_split(layer, x):
    """DoRA with autograd: z = x V^T computed as LoRA's split path does, then y = g * z + b."""
    W, b, A, B, s = layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling
    x2 = x.reshape(-1, layer.in_features)  # (N, in)
    g = layer.lora_magnitude_vector / row_norm(layer)  # (out,), m's gradient flows, the norm's does not
    dropout = layer.training and layer.dropout > 0
    xd = layer.lora_dropout(x2) if dropout else x2  # (N, in)
    z = frozen_linear(xd, W)  # (N, out)
    z.addmm_(F.linear(xd, A), B.t().to(z.dtype), alpha=s)  # z = xd V^T, in place as in LoRA's split path
    y = z * g.to(z.dtype)  # (N, out); autograd keeps z for dm
    if dropout:  # PEFT: the base layer's own term on the undropped x, minus the one g rescales
        y = y + frozen_linear(x2, W) - frozen_linear(xd, W)
    if b is not None:
        y = y + b.to(y.dtype)
    return y.view(*x.shape[:-1], layer.out_features)  # (..., out)


class DoRAFunction(torch.autograd.Function):
    """y = g * (x V^T) + b, V = W + s B A, g = m / ||V|| (norm constant), with a hand-written backward.

    Let x be (N, in) (leading dims flattened), dy = dL/dy (N, out), z = x V^T (N, out), dz = dy * g:
        dx = dz V                              (N, out) @ (out, in)
        dA = s (dz B)^T x                      (r, N) @ (N, in)     thin, as in LoRA's fused backward
        dB = s dz^T (x A^T)                    (out, N) @ (N, r)
        dm = sum_n (dy * z)_n / ||V||          (out,)
        db = sum_n dy_n
    These are the exact derivatives with ||V|| held constant (what `norm`, if given, makes explicit).
    dV = dz^T x would be weight-sized; associativity gives dA and dB without it. dm needs z: keeping it costs one
    (N, out) activation, the same one autograd keeps in the split mode; the alternatives are a second big GEMM
    in the backward (recompute z) or the weight-sized dy^T x. Saved: x, z, g, ||V|| and the parameters; V is
    recomputed in the backward for dx (2*out*r*in FLOPs) rather than kept alive from the forward. A quantized
    weight stays packed (in ctx) and is dequantized again there.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, norm=None):
        with torch.autocast(x.device.type, enabled=False):
            W = dense(weight)  # (out, in); a quantized weight dequantized
            V = torch.addmm(W, lora_B.to(W.dtype), lora_A.to(W.dtype), alpha=scaling)  # (out, in)
            if norm is None:  # the layer's case; gradcheck passes the norm in, to hold it fixed explicitly
                norm = torch.linalg.norm(V, dim=1)  # (out,)
        g = magnitude / norm  # (out,)
        z = F.linear(x, V)  # (..., out): the one big GEMM, on the V the norm needed anyway
        y = z * g.to(z.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        quantized = not isinstance(weight, torch.Tensor)
        ctx.save_for_backward(x, None if quantized else weight, lora_A, lora_B, z, g, norm)
        ctx.quantized_weight = weight if quantized else None
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, z, g, norm = ctx.saved_tensors
        weight = weight if ctx.quantized_weight is None else ctx.quantized_weight
        s = ctx.scaling
        need_x, need_w, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:6]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        dy = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        dz = dy * g.to(dy.dtype)  # (N, out)
        dx = dw = db = dA = dB = dm = None
        if need_x:
            with torch.autocast(x.device.type, enabled=False):
                W = dense(weight)  # (out, in)
                V = torch.addmm(W, lora_B.to(W.dtype), lora_A.to(W.dtype), alpha=s)  # (out, in)
            dx = (dz @ V.to(dz.dtype)).reshape(x.shape).to(x.dtype)  # (..., in)
        if need_A:
            dA = (s * ((dz @ lora_B.to(dz.dtype)).t() @ x2.to(dz.dtype))).to(lora_A.dtype)  # (r, in)
        if need_B:
            dB = (s * (dz.t() @ (x2 @ lora_A.t().to(x2.dtype)).to(dz.dtype))).to(lora_B.dtype)  # (out, r)
        if need_m:
            dm = ((dy * z.reshape(dy.shape).to(dy.dtype)).sum(0) / norm).to(g.dtype)  # (out,)
        if need_b and ctx.has_bias:
            db = dy.sum(0).to(weight.dtype)  # (out,)
        if need_w:  # only if someone unfroze the base weight: dW = dV = dz^T x (norm constant)
            dw = (dz.t() @ x2.to(dz.dtype)).to(weight.dtype)  # (out, in)
        return dx, dw, db, dA, dB, dm, None, None


def forward_fused(layer, x):
    return DoRAFunction.apply(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector,
                              layer.scaling)


# --- merging: W' = g * V is an ordinary weight ------------------------------------------------------------------

@torch.no_grad()
def merged_weight(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(W' = g * (W + s B A) (out, in), g (out,)) in fp32 at least, from the unmerged weight."""
    delta = layer.delta_weight()  # (out, in), fp32 at least
    V = dense(layer.weight).to(delta.dtype) + delta
    g = layer.lora_magnitude_vector.to(delta.dtype) / torch.linalg.norm(V, dim=1)  # (out,)
    return g[:, None] * V, g


@torch.no_grad()
def unmerged_weight(layer, g) -> torch.Tensor:
    """W = W' / g - s B A, with the g used when merging (the norm of the merged weight is another number)."""
    delta = layer.delta_weight()
    return layer.weight.to(delta.dtype) / g[:, None] - delta
