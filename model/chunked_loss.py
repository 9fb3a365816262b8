"""Linear + cross-entropy in chunks of tokens: the loss of lm_head(x) without ever holding the full logits.

A language model's last step turns hidden states x (N, C) into logits x W^T (N, V) and takes their
cross-entropy with the targets. For GPT-2 124M at B=4, T=1024 (N = 4096 tokens, V = 50304, fp32) one copy of
those logits is N V 4 bytes = 824 MB, and the plain path (lm_head, then F.cross_entropy) holds several: the
logits, log_softmax's output saved for backward, then their gradients in backward: ~2.5 GB, more than all of
the model's weights, gradients and AdamW states together (1.5 GB), for a tensor that is only needed row by row.

Here the N tokens go through in chunks of n (`chunk_size`). Per chunk, forward computes the logits
z = x_c W^T (n, V), loss_i = logsumexp(z_i) - z_i[t_i], and, when autograd will need gradients, turns z in place
into dlogits = softmax(z) - onehot(t) (the gradient of cross-entropy w.r.t. its logits) and accumulates
dx_c = dlogits W (n, C) and, only when the head trains, dW += dlogits^T x_c (V, C); then z is dropped. Backward
only multiplies dx and dW by the incoming gradient (as Liger-Kernel does). Memory: one chunk n V 4 bytes at a
time (n = 1024: 206 MB for GPT-2, 4x less than one full copy), plus dx (the size of x, which is no longer kept)
and dW (V, C) when the head trains. FLOPs: those of the plain path. The cost: a loss computed with gradients
enabled but never backpropagated pays for them (evaluation runs under no_grad and does not).
recompute=True is the other order: forward keeps x and computes only the loss; backward recomputes z chunk by
chunk and forms the same gradients. The peak is the same (dx and dW exist at the start of backward either way),
but the head's matmul (2 N V C FLOPs) runs twice (+12% of a GPT-2 124M LoRA step's FLOPs; 14.5 GFLOP a step
for SmolLM2's 49k vocabulary at B=1, T=256).
Targets equal to `ignore_index` (-1 here, as everywhere in this codebase) are skipped, and the mean is over
the remaining tokens, as F.cross_entropy(..., ignore_index=-1) does; reduction="sum" gives the sum, for a
caller that normalises by a token count of its own (e.g. across micro-batches).
"""
import torch
from tools.errors import UserError

DEFAULT_CHUNK_SIZE = 1024  # tokens per chunk: 1024 x 50304 fp32 logits = 206 MB for GPT-2


def _chunk_loss_(z, targets, valid):
    """Summed loss of one chunk of logits z (n, V) float32; leaves exp(z - row max) in z. Returns (loss, row sums)."""
    target_logit = z.gather(1, targets[:, None]).squeeze(1)  # (n,) z_i[t_i], taken before z is overwritten
    row_max = z.amax(dim=1)  # (n,)
    sums = z.sub_(row_max[:, None]).exp_().sum(dim=1)  # (n,) in place: shift by the max so exp never overflows
    lse = row_max + sums.log()  # (n,) logsumexp
    return ((lse - target_logit) * valid).sum(), sums


def _chunk_grads_(z, sums, targets, row_scale, x_c, w, grad_x_c, grad_w):
    """From exp(z - max) (n, V), in place: dlogits = (softmax - onehot(t)) * dloss/dloss_i; then dx_c and dW."""
    z.div_(sums[:, None])  # softmax
    z[torch.arange(z.size(0), device=z.device), targets] -= 1.0  # - onehot(t)
    z.mul_(row_scale[:, None])  # ignored rows become 0
    dz = z.to(w.dtype)  # (n, V): a no-op in fp32
    if grad_x_c is not None:
        torch.mm(dz, w, out=grad_x_c)  # (n, V) @ (V, C) -> (n, C)
    if grad_w is not None:
        if dz.dtype == grad_w.dtype:
            grad_w.addmm_(dz.t(), x_c)  # (V, n) @ (n, C), accumulated in place
        else:
            grad_w += dz.t() @ x_c  # bf16 product, float32 accumulator


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """loss = cross_entropy(x W^T, targets) for x (N, C), W (V, C), targets (N,); see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size, ignore_index, reduction, compute_dtype, grads_in_forward):
        n = chunk_size
        w = weight.to(compute_dtype)  # a no-op in fp32; under autocast one bf16 copy of W, as nn.Linear makes
        valid = targets != ignore_index  # (N,)
        safe_targets = targets.masked_fill(~valid, 0)  # any index: those rows are zeroed
        n_valid = valid.sum()
        divisor = n_valid if reduction == "mean" else torch.ones((), device=x.device)
        row_scale = valid.float() / divisor  # (N,) dloss/dloss_i
        grad_x = torch.empty_like(x, dtype=compute_dtype) if grads_in_forward and ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if grads_in_forward and ctx.needs_input_grad[1] else None
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, x.size(0), n):
            x_c = x[s:s + n].to(compute_dtype)  # (n, C)
            z = (x_c @ w.t()).float()  # (n, V): the only large tensor
            loss_c, sums = _chunk_loss_(z, safe_targets[s:s + n], valid[s:s + n])
            total += loss_c
            if grads_in_forward:
                _chunk_grads_(z, sums, safe_targets[s:s + n], row_scale[s:s + n], x_c, w,
                              None if grad_x is None else grad_x[s:s + n], grad_w)
            del z
        if grads_in_forward:  # backward only scales them: x is not kept, and no logits are recomputed
            ctx.grad_x, ctx.grad_w = grad_x, grad_w
        else:
            ctx.save_for_backward(x, weight, safe_targets, row_scale)
        ctx.chunk_size, ctx.compute_dtype, ctx.grads_in_forward = chunk_size, compute_dtype, grads_in_forward
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        return total / divisor  # all ignored with reduction="mean": 0/0 = nan, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads_in_forward:
            grad_x, grad_w = ctx.grad_x, ctx.grad_w
            ctx.grad_x = ctx.grad_w = None
            grad_x = None if grad_x is None else grad_x.mul_(grad_loss).to(ctx.x_dtype)
            grad_w = None if grad_w is None else grad_w.mul_(grad_loss).to(ctx.w_dtype)
            return grad_x, grad_w, None, None, None, None, None, None
        x, weight, safe_targets, row_scale = ctx.saved_tensors
        n, w = ctx.chunk_size, weight.to(ctx.compute_dtype)
        row_scale = row_scale * grad_loss  # (N,)
        grad_x = torch.empty_like(x, dtype=ctx.compute_dtype) if ctx.needs_input_grad[0] else None  # (N, C)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None  # (V, C)
        for s in range(0, x.size(0), n):
            x_c = x[s:s + n].to(ctx.compute_dtype)  # (n, C)
            z = (x_c @ w.t()).float()  # (n, V): recomputed, not kept from forward
            _, sums = _chunk_loss_(z, safe_targets[s:s + n], row_scale[s:s + n])  # for exp(z - max) and sums
            _chunk_grads_(z, sums, safe_targets[s:s + n], row_scale[s:s + n], x_c, w,
                          None if grad_x is None else grad_x[s:s + n], grad_w)
            del z
        grad_x = None if grad_x is None else grad_x.to(ctx.x_dtype)
        grad_w = None if grad_w is None else grad_w.to(ctx.w_dtype)
        return grad_x, grad_w, None, None, None, None, None, None


def linear_cross_entropy(x, weight, targets, chunk_size=DEFAULT_CHUNK_SIZE, ignore_index=-1, reduction="mean",
                         recompute=False):
    """Cross-entropy of the logits x W^T against targets, computed chunk_size tokens at a time.

    x (..., C) hidden states, weight (V, C) the head's weight (lm_head.weight; for a LoRA head W + s B A, a tensor
    with a graph: its gradient flows on to what made it), targets (...) token ids or ignore_index.
    Equals F.cross_entropy((x @ weight.T).view(-1, V).float(), targets.view(-1), ignore_index=ignore_index,
    reduction=reduction), with gradients for x and (when it requires grad) weight. Under autocast the matmuls
    run in the autocast dtype, as lm_head would, and the softmax in float32. recompute=False computes the gradients
    in forward when autograd will ask for them (the default; see the module docstring); recompute=True keeps x
    and recomputes the logits in backward.
    """
    if chunk_size < 1:
        raise UserError(f"chunk_size={chunk_size}: must be >= 1 token")
    if reduction not in ("mean", "sum"):
        raise UserError(f"reduction={reduction!r}: use 'mean' or 'sum'")
    x2, t = x.reshape(-1, x.size(-1)), targets.reshape(-1)  # (N, C), (N,)
    if x2.size(0) != t.size(0):
        raise UserError(f"{x2.size(0)} hidden states but {t.size(0)} targets")
    device_type = x.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    grads_in_forward = not recompute and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    with torch.autocast(device_type, enabled=False):  # the Function casts explicitly, forward and backward alike
        return ChunkedLinearCrossEntropy.apply(x2, weight, t, chunk_size, ignore_index, reduction, compute_dtype,
                                               grads_in_forward)
