"""LoRALinear: a frozen nn.Linear plus a trainable low-rank update. The whole idea of LoRA lives here.

Fine-tuning changes a pretrained weight W (out, in) into W + dW. LoRA (Hu et al., 2021) trains dW in factored form:
    dW = s * B @ A        A: (r, in)   B: (out, r)   r << min(in, out)
    y  = x W^T + b + s * (x A^T) B^T
W and b stay frozen (no gradient, no optimizer state); only r * (in + out) numbers per layer train (r=8 on GPT-2's
c_attn, 768 -> 2304: 24,576 instead of 1,769,472). s = alpha / r, so a learning rate tuned at one rank roughly carries
over; rsLoRA's s = alpha / sqrt(r) (`rslora=True`) keeps large ranks learning. A starts random (Kaiming, as PEFT) and
B at zero: a fresh adapter leaves the model unchanged, and B gets a gradient at step one (with both zero, neither
ever would: dA = s (dy B)^T x and dB = s dy^T (x A^T) would both be 0).

Two ways to compute the same y (`mode`):
    split   x W^T + b + s (dropout(x) A^T) B^T: one big GEMM and two thin ones; autograd does the backward
    fused   x (W + s B A)^T + b: one big GEMM after forming W' = W + s B A; a hand-written backward
            (FusedLoRALinear) never builds a weight-sized gradient. No dropout: no single W' serves x and dropout(x)
Which is faster depends on the token count and the shapes: the cost model and the measurements are in
bench/fused_vs_split.py and bench/results/. Split-mode layers that read the same input (LLaMA's q/k/v)
compute their x A^T together, one GEMM for all (lora/grouped.py; model/modules.py's project() asks group_forward).
merge() folds s B A into W (a plain F.linear; unmerge() undoes it up to rounding). As in loralib, the frozen
weight keeps the name `weight`, so a plain checkpoint loads unchanged.
On a quantized base (QLoRA, quant/quantize.py) `weight` is packed: it is read only through dense() and
frozen_linear(), which dequantize on the fly and keep no full-precision W; merge() refuses (use merge_and_unload).
effective_weight() is the one (out, in) weight W' with y = x W'^T + b, differentiable in A and B: the chunked
training loss (model/lm.py) asks a LoRA lm_head for it instead of computing the (N, V) logits through forward().
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import dora
from lora.grouped import group_forward
from quant.quantize import QuantLinear, dense, frozen_linear  # dense(W): (out, in); frozen_linear: x W^T + b
from tools.errors import UserError

MODES = ("split", "fused")


class FusedLoRALinear(torch.autograd.Function):
    """y = x (W + s B A)^T + b, with a backward (derived inside it) that builds no weight-sized gradient.

    custom_fwd/custom_bwd (device_type="cuda") make the backward run under the same autocast state as the forward,
    so under torch.autocast(bfloat16) the GEMMs run in bf16 in both directions. Gradients are returned in the
    dtype of the tensor they belong to (fp32 parameters get fp32 gradients).
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        merged_weight = torch.addmm(dense(weight), lora_B, lora_A, alpha=scaling)  # W + s*B@A: (out, in), temporary
        # saved: x, W, A, B. W, A, B are parameters (no extra memory), so only x is new, the same x the frozen layer
        # keeps anyway. W' is not saved but recomputed in backward: keeping it would hold one more weight-sized
        # tensor per layer until backward (GPT-2 124M, c_attn only: 12 * 768 * 2304 * 4 bytes = 85 MB in fp32), while
        # recomputing costs 2*out*r*in FLOPs, a fraction r/N of the dx GEMM. A quantized W stays packed (in ctx).
        quantized = not isinstance(weight, torch.Tensor)
        ctx.save_for_backward(x, None if quantized else weight, lora_A, lora_B)
        ctx.quantized_weight = weight if quantized else None
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return F.linear(x, merged_weight, bias)  # (..., out), the one big GEMM

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_out):
        # x (N, in) with the leading dims flattened into N tokens, dy = dL/dy (N, out). Differentiating
        # y = x W'^T + b with W' = W + s B A:
        #     dx  = dy W'                              (N, out) @ (out, in)
        #     dW' = dy^T x                             (out, in): weight-sized, never built
        #     dB  = s * dW' A^T = s * dy^T (x A^T)     (out, N) @ (N, r)
        #     dA  = s * B^T dW' = s * (dy B)^T x       (r, N) @ (N, in)
        #     db  = dy summed over the N tokens
        # Associativity is the whole trick: (x A^T) and (dy B) are thin (N, r), so dA and dB cost O(N r (in + out))
        # and no (out, in) gradient exists. Autograd on x @ (W + s*B@A).T would form dW', a full weight-sized
        # gradient per layer per step: exactly what LoRA is meant to avoid.
        x, weight, lora_A, lora_B = ctx.saved_tensors
        weight = weight if ctx.quantized_weight is None else ctx.quantized_weight
        s = ctx.scaling
        need_x, need_w, need_b, need_A, need_B, _ = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        dy = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        dx = dw = db = dA = dB = None
        if need_x:  # recompute W' rather than keep it alive since the forward (see forward)
            merged_weight = torch.addmm(dense(weight), lora_B, lora_A, alpha=s)  # (out, in)
            dx = (dy @ merged_weight.to(dy.dtype)).reshape(x.shape).to(x.dtype)  # (..., in)
        if need_A:
            dy_B = dy @ lora_B.to(dy.dtype)  # (N, r)
            dA = (s * (dy_B.t() @ x2.to(dy.dtype))).to(lora_A.dtype)  # (r, N) @ (N, in) -> (r, in)
        if need_B:
            x_At = x2 @ lora_A.t().to(x2.dtype)  # (N, r)
            dB = (s * (dy.t() @ x_At.to(dy.dtype))).to(lora_B.dtype)  # (out, N) @ (N, r) -> (out, r)
        if need_b and ctx.has_bias:
            db = dy.sum(0).to(weight.dtype)  # (out,)
        if need_w:  # only if someone unfroze the base weight; a LoRA run never gets here
            dw = (dy.t() @ x2.to(dy.dtype)).to(weight.dtype)  # (out, in)
        return dx, dw, db, dA, dB, None


class LoRALinear(nn.Module):
    """A frozen linear layer W (out, in) + bias, plus a trainable update s * B @ A of rank r.

    Built from an existing nn.Linear (or a QuantLinear), whose weight and bias it takes over (the same objects, no
    copy, so a weight tied to another module stays tied). They are frozen here (requires_grad=False).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 mode: str = "split"):
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantLinear)):
            raise TypeError(f"LoRALinear wraps an nn.Linear or a QuantLinear, got {type(base).__name__}")
        if not (isinstance(r, int) and r > 0):
            raise UserError(f"LoRA rank r must be a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # (out, in), frozen
        self.bias = base.bias  # (out,) or None, frozen
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        factory = dict(device=self.weight.device, dtype=self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))  # (out, r)
        self.lora_magnitude_vector = None  # (out,) for DoRA (lora/dora.py), else None
        self.r, self.lora_alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout = dropout
        self.merged = False  # True after merge(): weight holds W + s B A
        self.enabled = True  # False: behave as the frozen base layer (see lora_disabled)
        self.weight_is_tied = False  # set by apply_lora when `weight` is shared with another module
        self.set_mode(mode)
        self.reset_lora_parameters()

    group_projections = True  # run-time setting (lora.set_lora_grouping): see groupable() and lora/grouped.py
    group_forward = staticmethod(group_forward)  # model/modules.py's project(x, layers) calls it for q/k/v

    def groupable(self) -> bool:
        """Whether forward(x) is exactly what lora/grouped.py's GroupedLoRA computes for this layer, so that it may
        share its down-projection GEMM with other layers reading the same x: split-mode LoRA, no dropout in effect,
        not DoRA, not merged or disabled, this class's own forward (not a subclass's) and no forward hooks."""
        module = nn.modules.module  # hooks on this layer or on every module would be skipped by a grouped call
        hooks = (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks
                 or module._global_forward_hooks or module._global_forward_pre_hooks
                 or module._global_backward_hooks or module._global_backward_pre_hooks)
        return (self.group_projections and type(self).forward is LoRALinear.forward and not hooks and self.enabled
                and not self.merged and self.mode == "split" and self.lora_magnitude_vector is None
                and not (self.training and self.dropout > 0))

    def reset_lora_parameters(self, init: str = "kaiming"):
        """A ~ Kaiming-uniform(a=sqrt(5)) (or N(0, 1/r) for init='gaussian', PEFT's), B = 0: B A starts at zero."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def set_mode(self, mode: str):
        if mode not in MODES:
            raise UserError(f"LoRA mode must be one of {MODES}, got {mode!r}")
        if mode == "fused" and self.dropout > 0:
            raise UserError(f"LoRA mode 'fused' needs dropout=0 (got {self.dropout}): the LoRA term would see "
                             f"dropout(x) and the base term x, so W + s*B@A cannot be one GEMM. Use mode='split'.")
        self.mode = mode

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A, the (out, in) update this adapter represents (computed in fp32 at least)."""
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        return self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))  # (out, in)

    @torch.no_grad()
    def merge(self):
        """Fold s B A into weight in place; forward becomes a plain F.linear. Reversible with unmerge().

        While merged, `weight` (and so state_dict()) holds W + s B A: do not save a plain checkpoint from a
        merged model and load it into an unmerged one.
        """
        if self.merged:
            return
        if not isinstance(self.weight, torch.Tensor):
            raise RuntimeError("this LoRA layer's base weight is quantized: merging in place would re-quantize "
                               "W + s*B@A, which is lossy. Use merge_and_unload(model), which dequantizes W and "
                               "gives a full-precision merged layer.")
        if self.weight_is_tied:
            raise RuntimeError("this LoRA layer's weight is tied to another module (e.g. lm_head and wte): merging "
                               "in place would change that module too. Use merge_and_unload(model), which gives "
                               "this layer its own merged copy.")
        self.weight.copy_(self.merged_weight())  # computed in fp32 even if weight is bf16
        self.merged = True

    def merged_weight(self) -> torch.Tensor:
        """The (out, in) weight this layer computes with: W + s B A (DoRA: g * (W + s B A), lora/dora.py)."""
        if self.lora_magnitude_vector is not None:
            merged, self._dora_merge_scale = dora.merged_weight(self)  # unmerge divides by this g
            return merged
        delta = self.delta_weight()  # (out, in)
        return dense(self.weight).to(delta.dtype) + delta

    def effective_weight(self):
        """W' (out, in) with forward(x) = x W'^T + b, differentiable in what trains: W + s B A (DoRA: g (W + s B A)
        with the norm detached, lora/dora.py); W itself while merged or disabled. None in training with LoRA
        dropout: dropout(x) reaches the adapter and x the base, so no single W' gives the output (the caller must
        run forward). Computed with autocast off, in the weight's dtype. A subclass must keep forward(x) equal to
        x (W + delta_weight())^T + b, or override this (lora/adalora.py's SVDLinear keeps it)."""
        if self.merged or not self.enabled:
            if self.merged and not self.enabled:
                raise RuntimeError("LoRA layer is merged and disabled; unmerge it to run the base model")
            return dense(self.weight)
        if self.dropout > 0 and self.training:
            return None
        if self.lora_magnitude_vector is not None:
            return dora.effective_weight(self)
        with torch.autocast(self.lora_A.device.type, enabled=False):
            W = dense(self.weight)  # (out, in)
            delta = self.delta_weight()  # (out, in), fp32 at least; a graph to A and B
            return (W.to(delta.dtype) + delta).to(W.dtype)

    @torch.no_grad()
    def unmerge(self):
        """Undo merge(): weight -= s B A (equal to the original up to rounding)."""
        if not self.merged:
            return
        if self.lora_magnitude_vector is not None:
            self.weight.copy_(dora.unmerged_weight(self, self._dora_merge_scale))
        else:
            delta = self.delta_weight()  # (out, in)
            self.weight.copy_(self.weight.to(delta.dtype) - delta)
        self.merged = False

    def forward(self, x):
        if self.merged or not self.enabled:
            if self.merged and not self.enabled:
                raise RuntimeError("LoRA layer is merged and disabled; unmerge it to run the base model")
            return frozen_linear(x, self.weight, self.bias)  # plain layer: same cost as nn.Linear
        if self.lora_magnitude_vector is not None:
            return dora.forward_fused(self, x) if self.mode == "fused" else dora.forward_split(self, x)
        if self.mode == "fused":
            return FusedLoRALinear.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling)
        x2 = x.reshape(-1, self.in_features)  # (N, in): tokens flattened, a view for a contiguous x
        out = frozen_linear(x2, self.weight, self.bias)  # (N, out), the frozen layer
        x_At = F.linear(self.lora_dropout(x2), self.lora_A)  # (N, r)
        # out += s * (x A^T) B^T in place, as one GEMM with beta=1: no (N, out) temporary and no extra pass over
        # it. Autograd allows it because nothing saved `out` for backward (linear keeps x and W); `out` must not be
        # a view, or autograd would wrap the backward in a copy of the whole gradient. In-place ops skip autocast,
        # so B is cast to out's dtype by hand (a no-op in fp32, bf16 under CUDA autocast).
        out.addmm_(x_At, self.lora_B.t().to(out.dtype), alpha=self.scaling)
        return out.view(*x.shape[:-1], self.out_features)  # (..., out)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, mode={self.mode}"
                + (", dora" if self.lora_magnitude_vector is not None else "")
                + (", merged" if self.merged else "") + ("" if self.enabled else ", disabled"))
