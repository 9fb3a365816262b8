"""Linear + cross-entropy in chunks of tokens: the loss of lm_head(x) without ever holding the full logits.

A language model's last step turns hidden states x (N, C) into logits x W^T (N, V) and takes their
cross-entropy with the targets. For GPT-2 124M at B=4, T=1024 (N = 4096 tokens, V = 50304, fp32) one copy of
those logits is N V 4 bytes = 824 MB, and the plain path (lm_head, then F.cross_entropy) holds several: the
logits, log_softmax's output saved for backward, then their gradients in backward: ~2.5 GB, more than all of
the model's weights, gradients and AdamW states together (1.5 GB), for a tensor that is only needed row by row.

Here the N tokens go through in chunks of n (`chunk_size`). Per chunk, forward computes the logits
z = x_c W^T (n, V) and loss_i = logsumexp(z_i) - z_i[t_i], and drops z. Backward recomputes z chunk by chunk
and turns it in place into dlogits = softmax(z) - onehot(t) (the gradient of cross-entropy w.r.t. its logits),
then accumulates dx_c = dlogits W (n, C) and, only when the head trains, dW += dlogits^T x_c (V, C).
Memory: one chunk n V 4 bytes at a time (n = 1024: 206 MB for GPT-2, 4x less than one full copy), plus what
any linear layer keeps anyway (x and W), plus dW (V, C) when the head trains. The price: the head's forward
matmul (2 N V C FLOPs) runs twice, once more in backward.
Targets equal to `ignore_index` (-1 here, as everywhere in this codebase) are skipped, and the mean is over
the remaining tokens, as F.cross_entropy(..., ignore_index=-1) does; reduction="sum" gives the sum, for a
caller that normalises by a token count of its own (e.g. across micro-batches).
"""
import torch

DEFAULT_CHUNK_SIZE = 1024  # tokens per chunk: 1024 x 50304 fp32 logits = 206 MB for GPT-2


def _softmax_(z):
    """softmax over dim 1, in place on z (n, V); returns log of the row sums of exp(z - max): (n,)."""
    z.sub_(z.amax(dim=1, keepdim=True))  # shift by the row max: exp never overflows
    z.exp_()
    sums = z.sum(dim=1, keepdim=True)  # (n, 1)
    z.div_(sums)
    return sums.squeeze(1).log()


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """loss = cross_entropy(x W^T, targets) for x (N, C), W (V, C), targets (N,); see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size, ignore_index, reduction, compute_dtype):
        w = weight.to(compute_dtype)  # a no-op in fp32; under autocast one bf16 copy of W, as nn.Linear makes
        valid = targets != ignore_index  # (N,)
        safe_targets = targets.masked_fill(~valid, 0)  # any index: those rows are zeroed below
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for s in range(0, x.size(0), chunk_size):
            z = (x[s:s + chunk_size].to(compute_dtype) @ w.t()).float()  # (n, V): the only large tensor
            target_logit = z.gather(1, safe_targets[s:s + chunk_size, None]).squeeze(1)  # (n,) z_i[t_i]
            row_max = z.amax(dim=1)  # (n,)
            lse = row_max + z.sub_(row_max[:, None]).exp_().sum(dim=1).log()  # (n,) logsumexp, in place on z
            total += ((lse - target_logit) * valid[s:s + chunk_size]).sum()
            del z
        n_valid = valid.sum()
        ctx.save_for_backward(x, weight, safe_targets, valid)
        ctx.chunk_size, ctx.compute_dtype = chunk_size, compute_dtype
        ctx.divisor = n_valid if reduction == "mean" else None
        return total / n_valid if reduction == "mean" else total  # all ignored: 0/0 = nan, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        x, weight, safe_targets, valid = ctx.saved_tensors
        n = ctx.chunk_size
        w = weight.to(ctx.compute_dtype)
        scale = grad_loss / ctx.divisor if ctx.divisor is not None else grad_loss  # d(loss)/d(loss_i)
        row_scale = valid.float() * scale  # (N,): 0 for ignored tokens
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None  # (N, C)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None  # (V, C)
        for s in range(0, x.size(0), n):
            x_c = x[s:s + n].to(ctx.compute_dtype)  # (n, C)
            z = (x_c @ w.t()).float()  # (n, V): recomputed, not stored from forward
            _softmax_(z)  # z is now softmax(z)
            rows = torch.arange(z.size(0), device=z.device)
            z[rows, safe_targets[s:s + n]] -= 1.0  # dlogits = softmax - onehot(t)
            z.mul_(row_scale[s:s + n, None])  # times dloss/dloss_i; ignored rows become 0
            dz = z.to(ctx.compute_dtype)  # (n, V)
            if grad_x is not None:
                grad_x[s:s + n] = dz @ w  # (n, V) @ (V, C) -> (n, C)
            if grad_w is not None:
                if dz.dtype == torch.float32:
                    grad_w.addmm_(dz.t(), x_c)  # (V, n) @ (n, C), accumulated in place
                else:
                    grad_w += dz.t() @ x_c  # bf16 product, fp32 accumulator
            del z, dz
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_x, grad_w, None, None, None, None, None


def linear_cross_entropy(x, weight, targets, chunk_size=DEFAULT_CHUNK_SIZE, ignore_index=-1, reduction="mean"):
    """Cross-entropy of the logits x W^T against targets, computed chunk_size tokens at a time.

    x (..., C) hidden states, weight (V, C) the head (lm_head.weight), targets (...) token ids or ignore_index.
    Equals F.cross_entropy((x @ weight.T).view(-1, V).float(), targets.view(-1), ignore_index=ignore_index,
    reduction=reduction), with gradients for x and (when it requires grad) weight. Under autocast the matmuls
    run in the autocast dtype, as lm_head would, and the softmax in float32.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}: must be >= 1 token")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: use 'mean' or 'sum'")
    x2, t = x.reshape(-1, x.size(-1)), targets.reshape(-1)  # (N, C), (N,)
    if x2.size(0) != t.size(0):
        raise ValueError(f"{x2.size(0)} hidden states but {t.size(0)} targets")
    device_type = x.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    with torch.autocast(device_type, enabled=False):  # the Function casts explicitly, forward and backward alike
        return ChunkedLinearCrossEntropy.apply(x2, weight, t, chunk_size, ignore_index, reduction, compute_dtype)
