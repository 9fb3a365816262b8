"""LoRA layers that read the same input, computed together: one GEMM for their down-projections.

In a LLaMA block q_proj, k_proj and v_proj all read the same normed x, and so do the MLP's gate_proj and up_proj
(the models group only q/k/v: for gate/up, whose base GEMMs are 8x wider, it measured no faster; bench/README.md).
Split-mode LoRA (lora/layer.py) gives each layer i its own thin GEMMs: x A_i^T forward, then (dy_i B_i)^T x for dA_i
and (dy_i B_i) A_i for its share of dx backward. Stacking the A's along the rank,

    A_cat = [A_1; A_2; ...; A_k]           (R, in),  R = r_1 + ... + r_k
    x A_cat^T = [x A_1^T | ... | x A_k^T]  (N, R)    one GEMM instead of k, each layer reading its columns

makes each of those three a single GEMM over all k layers (Unsloth's LoRA_QKV / LoRA_MLP, derived here).
With y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T and dy_i = dL/dy_i (N, out_i), let

    G = [s_1 dy_1 B_1 | ... | s_k dy_k B_k]          (N, R)    the gradient reaching x A_cat^T
    dA_cat = G^T x                                   (R, N) @ (N, in): every dA_i at once, rows r_1, r_2, ...
    dB_i   = s_i dy_i^T (x A_i^T)                    (out_i, N) @ (N, r_i), per layer (its own dy_i)
    dx     = G A_cat + sum_i dy_i W_i                (N, R) @ (R, in), plus the k base GEMMs, accumulated in place
    db_i   = dy_i summed over the N tokens

dA_cat = G^T x holds because row block i of G^T x is (s_i dy_i B_i)^T x = dA_i, split-mode's own formula; the
same block structure gives G A_cat = sum_i s_i dy_i B_i A_i, the LoRA share of dx. The base GEMMs stay per layer:
one GEMM on torch.cat of the W's would copy them every step for no fewer FLOPs, and measured no faster (CPU, one
thread, SmolLM2's q/k/v at N = 512: 8.1-9.5 ms for the three forward GEMMs, 9.7-9.8 ms with the cat). The A's are
concatenated at call time: the parameters stay per layer (lora_A/lora_B of q_proj, k_proj, v_proj: PEFT's adapter
files are unchanged), and torch.cat of R x in numbers (SmolLM2, r=16: 48 x 576 fp32, 110 kB, about 4 us) is tiny
next to the N x in x R GEMM it feeds.
One autograd.Function returns all k outputs, so its backward receives every dy_i at once.

Memory: the same as the separate layers: x (which each layer keeps anyway) and x A_cat^T (N, R), which is the k
(N, r_i) tensors the split layers keep for dB, side by side.

What is grouped, and what is not. GroupedLoRA computes exactly split-mode LoRA without dropout. A layer that is
anything else runs on its own, as layer(x): LoRA dropout in training (PEFT draws a separate mask per layer, so
each layer's A sees a different input), DoRA, mode='fused', a merged or disabled adapter (a plain F.linear then),
a subclass with its own forward (AdaLoRA's SVDLinear), a layer with forward hooks (grouping would skip them),
or a group member whose lora_A has another dtype or device. With fewer than two layers left, nothing is grouped.
A quantized base (QLoRA) is grouped: W_i is dequantized for its GEMM, in forward and again in backward, and never
kept. A layer that is not a LoRALinear at all (k_proj left plain by lora_targets=q_proj,v_proj) is not handed
here: model/modules.py's project() groups only layers whose type offers group_forward.
"""
import torch
import torch.nn.functional as F

from quant.quantize import dense  # dense(W): (out, in); a quantized W dequantized


class GroupedLoRA(torch.autograd.Function):
    """[x W_i^T + b_i + s_i (x A_i^T) B_i^T for each layer i], the down-projections as one GEMM (see the module
    docstring for the backward's derivation).

    apply(x, scalings, W_1, b_1, A_1, B_1, W_2, b_2, A_2, B_2, ...): scalings a tuple of k floats, W_i a tensor or
    a quantized weight (quant/quantize.py), b_i a tensor or None. custom_fwd/custom_bwd as in lora/layer.py: under
    CUDA autocast the GEMMs run in bf16 in both directions; gradients come back in their parameter's dtype.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, scalings, *params):
        Ws, bs, As, Bs = params[0::4], params[1::4], params[2::4], params[3::4]
        x2 = x.reshape(-1, x.shape[-1])  # (N, in), the leading dims flattened into N tokens
        ranks = [A.shape[0] for A in As]
        x_At = F.linear(x2, torch.cat(As))  # (N, R): every layer's x A_i^T, in one GEMM
        outs = []
        for W, b, B, s, x_Ai in zip(Ws, bs, Bs, scalings, x_At.split(ranks, dim=1)):  # x_Ai (N, r_i), a view
            out = F.linear(x2, dense(W), b)  # (N, out_i), the frozen layer
            out.addmm_(x_Ai, B.t().to(out.dtype), alpha=s)  # += s (x A_i^T) B_i^T in place, as split mode does
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))  # (..., out_i)
        quantized = [not isinstance(W, torch.Tensor) for W in Ws]
        ctx.save_for_backward(x, x_At, *[None if q else W for W, q in zip(Ws, quantized)], *As, *Bs)
        ctx.quantized_weights = [W if q else None for W, q in zip(Ws, quantized)]  # packed: dequantized again
        ctx.scalings, ctx.ranks = scalings, ranks
        ctx.bias_dtypes = [None if b is None else b.dtype for b in bs]
        return tuple(outs)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *grad_outs):
        k = len(ctx.ranks)
        x, x_At, *rest = ctx.saved_tensors
        Ws = [W if q is None else q for W, q in zip(rest[:k], ctx.quantized_weights)]
        As, Bs = rest[k:2 * k], rest[2 * k:]
        need_x = ctx.needs_input_grad[0]
        need_W, need_b, need_A, need_B = (ctx.needs_input_grad[2 + j::4] for j in range(4))
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        dys = [dy.reshape(-1, dy.shape[-1]) for dy in grad_outs]  # (N, out_i) each
        dtype = dys[0].dtype
        dx, dW, db, dA, dB = None, [None] * k, [None] * k, [None] * k, [None] * k
        if need_x or any(need_A):
            G = torch.cat([s * (dy @ B.to(dtype)) for dy, B, s in zip(dys, Bs, ctx.scalings)], dim=1)  # (N, R)
        if need_x:
            dx = G @ torch.cat(As).to(dtype)  # (N, R) @ (R, in): the LoRA share of dx for all k layers
            for dy, W in zip(dys, Ws):
                dx.addmm_(dy, dense(W).to(dtype))  # += dy_i W_i (N, out_i) @ (out_i, in), in place
            dx = dx.view(x.shape).to(x.dtype)  # (..., in)
        if any(need_A):
            dA_cat = G.t() @ x2.to(dtype)  # (R, N) @ (N, in) -> (R, in): every dA_i, stacked
            dA = [d.to(A.dtype) if n else None for d, A, n in zip(dA_cat.split(ctx.ranks), As, need_A)]
        for i, (dy, x_Ai) in enumerate(zip(dys, x_At.split(ctx.ranks, dim=1))):
            if need_B[i]:
                dB[i] = (ctx.scalings[i] * (dy.t() @ x_Ai.to(dtype))).to(Bs[i].dtype)  # (out_i, N) @ (N, r_i)
            if need_b[i] and ctx.bias_dtypes[i] is not None:
                db[i] = dy.sum(0).to(ctx.bias_dtypes[i])  # (out_i,)
            if need_W[i]:  # only if someone unfroze a base weight; a LoRA run never gets here
                dW[i] = (dy.t() @ x2.to(dtype)).to(Ws[i].dtype)  # (out_i, in)
        return (dx, None, *[g for grads in zip(dW, db, dA, dB) for g in grads])


def group_forward(x, layers):
    """[layer(x) for layer in layers], the ones that can be grouped (LoRALinear.groupable()) computed together by
    GroupedLoRA; the others, or all of them if fewer than two can, one by one. model/modules.py's project() calls
    this through LoRALinear.group_forward."""
    grouped = [layer.groupable() for layer in layers]
    members = [layer for layer, g in zip(layers, grouped) if g]
    A0 = members[0].lora_A if members else None
    if len(members) < 2 or any(m.lora_A.dtype != A0.dtype or m.lora_A.device != A0.device for m in members):
        return [layer(x) for layer in layers]  # one torch.cat of their A's would not be what they compute
    params = [t for m in members for t in (m.weight, m.bias, m.lora_A, m.lora_B)]
    outs = iter(GroupedLoRA.apply(x, tuple(m.scaling for m in members), *params))
    return [next(outs) if g else layer(x) for layer, g in zip(layers, grouped)]


def set_lora_grouping(model, on: bool):
    """Turn grouping on or off for every LoRA layer of `model` (a run-time setting, like set_lora_mode: the
    result is the same up to rounding either way). Returns the model."""
    for module in model.modules():
        if hasattr(module, "group_projections"):
            module.group_projections = bool(on)
    return model
