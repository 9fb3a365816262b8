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
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def updated_weight(layer) -> torch.Tensor:
    """V = W + s B A (out, in), in the weight's dtype with autocast off (the norm wants full precision)."""
    with torch.autocast(layer.weight.device.type, enabled=False):
        return torch.addmm(layer.weight, layer.lora_B.to(layer.weight.dtype), layer.lora_A.to(layer.weight.dtype),
                           alpha=layer.scaling)


def row_norm(layer) -> torch.Tensor:
    """||W + s B A|| per output row (out,), detached: DoRA's norm passes no gradient."""
    with torch.no_grad():
        return torch.linalg.norm(updated_weight(layer), dim=1)


def add_magnitude(layer):
    """Give a LoRALinear its trainable magnitude m = ||W + s B A|| (out,): the layer becomes a DoRA layer."""
    if layer.weight_is_tied:
        raise ValueError("DoRA on a weight tied to another module is not supported (the norm is per output row of "
                         "this layer's own weight); leave the tied layer out of the targets")
    layer.lora_magnitude_vector = nn.Parameter(row_norm(layer).to(layer.lora_A.dtype))
    return layer


def forward_split(layer, x):
    """DoRA with autograd: z = x V^T computed as LoRA's split path does, then y = g * z + b."""
    W, b, A, B, s = layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling
    x2 = x.reshape(-1, layer.in_features)  # (N, in)
    g = layer.lora_magnitude_vector / row_norm(layer)  # (out,), m's gradient flows, the norm's does not
    dropout = layer.training and layer.dropout > 0
    xd = layer.lora_dropout(x2) if dropout else x2  # (N, in)
    z = F.linear(xd, W)  # (N, out)
    z.addmm_(F.linear(xd, A), B.t().to(z.dtype), alpha=s)  # z = xd V^T, in place as in LoRA's split path
    y = z * g.to(z.dtype)  # (N, out); autograd keeps z for dm
    if dropout:  # PEFT: the base layer's own term on the undropped x, minus the one g rescales
        y = y + F.linear(x2, W) - F.linear(xd, W)
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
    recomputed in the backward for dx (2*out*r*in FLOPs) rather than kept alive from the forward.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, norm=None):
        with torch.autocast(x.device.type, enabled=False):
            V = torch.addmm(weight, lora_B.to(weight.dtype), lora_A.to(weight.dtype), alpha=scaling)  # (out, in)
            if norm is None:  # the layer's case; gradcheck passes the norm in, to hold it fixed explicitly
                norm = torch.linalg.norm(V, dim=1)  # (out,)
        g = magnitude / norm  # (out,)
        z = F.linear(x, V)  # (..., out): the one big GEMM, on the V the norm needed anyway
        y = z * g.to(z.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(x, weight, lora_A, lora_B, z, g, norm)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        x, weight, lora_A, lora_B, z, g, norm = ctx.saved_tensors
        s = ctx.scaling
        need_x, need_w, need_b, need_A, need_B, need_m = ctx.needs_input_grad[:6]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        dy = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        dz = dy * g.to(dy.dtype)  # (N, out)
        dx = dw = db = dA = dB = dm = None
        if need_x:
            with torch.autocast(x.device.type, enabled=False):
                V = torch.addmm(weight, lora_B.to(weight.dtype), lora_A.to(weight.dtype), alpha=s)  # (out, in)
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
    V = layer.weight.to(delta.dtype) + delta
    g = layer.lora_magnitude_vector.to(delta.dtype) / torch.linalg.norm(V, dim=1)  # (out,)
    return g[:, None] * V, g


@torch.no_grad()
def unmerged_weight(layer, g) -> torch.Tensor:
    """W = W' / g - s B A, with the g used when merging (the norm of the merged weight is another number)."""
    delta = layer.delta_weight()
    return layer.weight.to(delta.dtype) / g[:, None] - delta
