"""PiSSA (Meng et al., 2024): start LoRA from W's principal singular directions instead of from zero.

    W = U S V^T  (out, in)       keep the top r:  U_r (out, r), S_r (r,), V_r^T (r, in)
    A0 = sqrt(S_r / s) V_r^T     B0 = U_r sqrt(S_r / s)     so that s B0 A0 is W's best rank-r approximation
    W_res = W - s B0 A0          the frozen base is replaced by this residual

At step 0 the model is unchanged (W_res + s B0 A0 = W), but LoRA now trains the directions that matter most and
the frozen part holds the rest. LoRAConfig(init='pissa') uses the exact SVD; 'pissa_niter_K' torch.svd_lowrank
with K subspace iterations (fast on large matrices, approximate). Both exactly as PEFT computes them.

Saving. The trained adapter only makes sense on W_res, which no one else has. So, as PEFT's save_pretrained(...,
path_initial_model_for_weight_conversion) does, save_adapter writes what the training changed relative to the
original W, as a plain LoRA of rank 2r:
    W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A ; A0]
i.e. A' = [A ; A0] (2r, in), B' = [B | -B0] (out, 2r), with r' = 2r and alpha' = 2 alpha (alpha sqrt(2) with
rsLoRA) so that the scaling s stays the same. It loads on the original base model in ours, PEFT, anywhere.
For that, every layer keeps A0 and B0 (buffers lora_A_init, lora_B_init; also in training checkpoints, so a
resumed run rebuilds the very same W_res even from a randomized SVD).

Not on a quantized base (QLoRA): apply_lora refuses init='pissa' there, as PEFT refuses PiSSA on a quantized weight
(it asks for PiSSA in full precision, then the residual quantized: QPiSSA, whose point is that W_res, without its
top singular directions, quantizes with less error than W). Our base is quantized while loading, before
apply_lora, so the full-precision W is gone; an SVD of the dequantized W with its residual quantized again would
round the base twice, and the model would no longer start as the base model (Q(W_res) + s B0 A0 != Q(W)).
"""
import re

import torch
from tools.errors import UserError

INITS = ("kaiming", "gaussian", "pissa")  # and "pissa_niter_K"


def check_init(init: str) -> str:
    if init in INITS or re.fullmatch(r"pissa_niter_\d+", str(init)):
        return init
    raise UserError(f"LoRAConfig.init must be one of {INITS} or 'pissa_niter_K' (K an int), got {init!r}")


def is_pissa(init) -> bool:
    return isinstance(init, str) and init.startswith("pissa")


@torch.no_grad()
def pissa_factors(weight: torch.Tensor, r: int, scaling: float, init: str = "pissa"):
    """(A0 (r, in), B0 (out, r)) with s B0 A0 the top-r part of W, in fp32 (PEFT's LoraLayer.pissa_init)."""
    W = weight.float()  # (out, in)
    if init == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # U (out, k), S (k,), Vh (k, in)
        U_r, S_r, Vh_r = U[:, :r], S[:r], Vh[:r]
    else:  # randomized: q = r columns, K power iterations
        U_r, S_r, V_r = torch.svd_lowrank(W, q=r, niter=int(init.split("_niter_")[1]))
        Vh_r = V_r.t()
    sqrt_S = torch.sqrt(S_r / scaling)  # (r,): split S_r / s evenly between A0 and B0
    return sqrt_S[:, None] * Vh_r, U_r * sqrt_S[None, :]


@torch.no_grad()
def pissa_init_(layer, init: str = "pissa", factors=None):
    """Turn a fresh LoRALinear into a PiSSA layer: A, B <- A0, B0 and weight <- W - s B0 A0, in place.

    `factors` (A0, B0) restores a saved initialization instead of computing the SVD again."""
    if not isinstance(layer.weight, torch.Tensor):
        raise UserError(f"init={init!r} cannot start from a quantized base ({layer.weight.method}): PiSSA's SVD and "
                         f"residual need the full-precision weight; use init='kaiming' or a full-precision base")
    if layer.weight_is_tied:
        raise UserError("PiSSA replaces the base weight by a residual; this layer's weight is tied to another "
                         "module, which would change too. Leave the tied layer out of the targets.")
    A0, B0 = factors if factors is not None else pissa_factors(layer.weight, layer.r, layer.scaling, init)
    A0, B0 = A0.float(), B0.float()
    layer.lora_A.copy_(A0)
    layer.lora_B.copy_(B0)
    layer.register_buffer("lora_A_init", A0.to(layer.lora_A.dtype).clone())
    layer.register_buffer("lora_B_init", B0.to(layer.lora_B.dtype).clone())
    residual = layer.weight.float() - layer.scaling * (B0 @ A0)  # (out, in)
    layer.weight.copy_(residual.to(layer.weight.dtype))
    return layer


def saved_factors(state: dict) -> dict:
    """{layer name: (A0, B0)} from a state dict holding lora_A_init / lora_B_init (a training checkpoint)."""
    return {k[: -len(".lora_A_init")]: (v, state[k[: -len("_A_init")] + "_B_init"])
            for k, v in state.items() if k.endswith(".lora_A_init")}


def as_plain_lora(layer):
    """(A' (2r, in), B' (out, 2r)): the trained PiSSA layer as a plain LoRA on the original weight."""
    A = torch.cat([layer.lora_A.detach(), layer.lora_A_init], dim=0)  # [A ; A0]
    B = torch.cat([layer.lora_B.detach(), -layer.lora_B_init], dim=1)  # [B | -B0]
    return A, B


def plain_lora_alpha(alpha: float, rslora: bool) -> float:
    """alpha' for rank 2r with the same scaling: alpha/r -> 2 alpha / 2r;  alpha/sqrt(r) -> sqrt(2) alpha/sqrt(2r)."""
    return alpha * 2 ** 0.5 if rslora else alpha * 2
