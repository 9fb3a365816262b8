"""How many bytes a training step needs at its peak, predicted from the model and the batch shape.

A step holds, besides the weights (all of them, frozen or not):
  - a gradient and AdamW's two moments for each trainable tensor (for LoRA only the adapters: ~nothing);
  - the activations autograd saves in forward for backward: per block, a fixed list of (B, T, width) tensors
    (saved_widths below; tests/test_memory.py checks the count against saved_tensors_hooks).
    With activation checkpointing a block saves only its input, and one block's list is rebuilt in backward;
  - the loss: one chunk of (n, V) float32 logits (model/chunked_loss.py), dx (N, C), and dW (V, C) if the head
    trains; with loss_chunk_size = 0, three (N, V): log_softmax's output, saved for backward (the logits
    themselves are gone once the caller drops them, as a training loop's `_, loss = model(x, y)` does), and in
    backward the gradient w.r.t. it and w.r.t. the logits, both alive while log_softmax's backward runs;
  - backward's working set: the gradients flowing through the block being differentiated, about two
    (B, T, widest hidden) tensors plus two of the residual stream.
The peak is the largest of three moments: the start of backward (every activation saved, the loss's buffers
alive), the backward of the first block (every gradient made, one block's activations alive), and the
optimizer step (weights, gradients, moments). AdamW allocates its moments in its first step, so the first step
of a run peaks lower than the ones after it when many tensors train.
On CPU, where the measure is the process's resident memory, add what running a step at all costs: torch's
kernels, thread pools and allocator arenas on first use, ~0.1 GB (CPU_RUNTIME_BYTES, measured on a 2-layer model
whose tensors are a few MB); and the resident memory follows the tensors only when freed tensors leave the process,
which glibc's malloc does not do by default (set_cpu_mmap_threshold below; train.py's cpu_mmap_threshold > 0). On CUDA,
max_memory_allocated counts tensors only.
Assumes dropout = 0 (a dropout layer adds a mask per (B, T, C) tensor it drops) and no LoRA dropout.
"""
from dataclasses import dataclass

import torch

from tools.resident import peak_rss_bytes

CPU_RUNTIME_BYTES = 100_000_000


@dataclass
class MemoryEstimate:
    weights: int  # bytes of every parameter (tied ones once)
    grads: int  # trainable parameters' gradients
    adamw: int  # AdamW's exp_avg and exp_avg_sq
    activations: int  # saved for backward at the start of backward
    loss: int  # the loss's own buffers in backward (chunk of logits, dx, dW of a trainable head)
    workspace: int  # gradients flowing through one block in backward
    recompute: int  # one block's activations rebuilt in backward (activation checkpointing), else 0
    runtime: int  # CPU: the process's own growth once it runs a step (CPU_RUNTIME_BYTES); CUDA: 0
    peak: int  # the largest of the three moments (see the module docstring)

    def summary(self):
        gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
        return (f"{gb(self.peak)} GB = max(start of backward, end of backward, optimizer step); weights "
                f"{gb(self.weights)}, grads {gb(self.grads)}, AdamW {gb(self.adamw)}, activations {gb(self.activations)}"
                f", loss {gb(self.loss)}, backward working set {gb(self.workspace + self.recompute)}, runtime "
                f"{gb(self.runtime)} GB")


def keeps_input(*linears):
    """Does autograd keep the input these Linears share? Only for a weight gradient: a trainable weight, or LoRA's
    dA = dh^T x. A frozen Linear needs only its weight for dx."""
    return any(getattr(m.weight, "requires_grad", False) or hasattr(m, "lora_A") for m in linears)  # a quantized W: frozen


def saved_widths(model):
    """(per block, after the last block): widths of the (B, T, width) tensors autograd keeps for backward, from
    block 0 (every block is alike). A tensor kept by two ops counts once; (B, T) statistics are left out."""
    c, C = model.config, model.config.n_embd
    if hasattr(c, "intermediate_size"):  # LLaMA
        blk, q, Fi = model.model.layers[0], c.n_head * c.head_dim, c.intermediate_size
        attn, mlp = blk.self_attn, blk.mlp

        def rms_norm(norm, *readers):  # its input (for d rsqrt), x * rsqrt (for the gain's grad), its output
            return [C] + [C] * norm.weight.requires_grad + [C] * keeps_input(*readers)
        widths = rms_norm(blk.input_layernorm, attn.q_proj, attn.k_proj, attn.v_proj)
        widths += [q, q, q, q]  # attention keeps rotated q, k and v (k, v repeated to H heads) and its output
        gemma = hasattr(blk, "pre_feedforward_layernorm")  # model/gemma.py: q/k norms, a norm on each branch's output
        if gemma:
            kv = c.n_kv_head * c.head_dim
            widths += [q, q, kv, kv]  # q_norm, k_norm: their inputs and x * rsqrt
            widths += rms_norm(blk.post_attention_layernorm) + rms_norm(blk.post_feedforward_layernorm)
        widths += rms_norm(blk.pre_feedforward_layernorm if gemma else blk.post_attention_layernorm, mlp.gate_proj,
                           mlp.up_proj)
        widths += [Fi, Fi, Fi] + [Fi] * keeps_input(mlp.down_proj)  # gate(x); silu(gate(x)), up(x); their product
        final = model.model.norm
        return widths, [C] + [C] * final.weight.requires_grad + [C]  # the last: the head's input, kept by the loss
    blk = model.transformer.h[0]  # GPT-2
    widths = [C] + [C] * keeps_input(blk.attn.c_attn)  # ln_1's input; its output, c_attn's input
    widths += [3 * C, C]  # attention keeps q, k, v and its output (also c_proj's input: the transpose back is free)
    widths += [C] + [C] * keeps_input(blk.mlp.c_fc)  # ln_2's input (the residual stream) and output
    widths += [4 * C] + [4 * C] * keeps_input(blk.mlp.c_proj)  # c_fc's output (GELU's input); GELU's output
    return widths, [C, C]  # after the blocks: ln_f's input and output (the head's input, kept by the loss)


def lora_widths(model):
    """LoRA split keeps x A^T (B, T, r) for dB per adapted layer (its x is the base layer's saved input)."""
    return [m.r for m in model.modules() if hasattr(m, "lora_A") and getattr(m, "mode", "split") == "split"]


def estimate_peak_bytes(model, batch_size, seq_len, activation_checkpointing=None, loss_chunk_size=None,
                        act_bytes=4, device="cpu"):
    """MemoryEstimate of one training step of `model` on (batch_size, seq_len) tokens.

    activation_checkpointing and loss_chunk_size default to the model's own settings. act_bytes: bytes per
    activation element (4 in float32; about 2 under bf16 autocast, where norms and the softmax stay float32).
    device: where it runs (CPU adds CPU_RUNTIME_BYTES).
    """
    ckpt = model.activation_checkpointing if activation_checkpointing is None else activation_checkpointing
    chunk = model.loss_chunk_size if loss_chunk_size is None else loss_chunk_size
    c = model.config
    N, C, V, L = batch_size * seq_len, c.n_embd, c.vocab_size, c.n_layer
    params = list(model.parameters())  # a tied tensor once
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    block, final = saved_widths(model)
    lora_per_block = sum(lora_widths(model)) // L
    per_block = N * (sum(block) + lora_per_block) * act_bytes  # bytes one block saves
    if chunk > 0 and not model.loss_recompute:
        final = final[:-1]  # the chunked loss forms its gradients in forward and keeps not its input but dx (loss)
    after_blocks = N * sum(final) * act_bytes
    activations = (L * N * C * act_bytes if ckpt else L * per_block) + after_blocks
    head = model.lm_head
    lora_head = hasattr(head, "lora_A")  # the chunked loss keeps W' = W + s B A (V, C) and forms dW' (V, C) in fp32
    head_grad = V * C * 4 if lora_head or getattr(head.weight, "requires_grad", False) else 0
    if chunk > 0:
        loss = min(chunk, N) * V * 4 + N * C * act_bytes + head_grad + (V * C * 4 if lora_head else 0)  # chunk, dx, dW
    else:
        loss = 3 * N * V * 4 + N * C * act_bytes + head_grad  # log_softmax's output, its gradient, dlogits; dx
    workspace = N * (2 * max(block) + 2 * C) * act_bytes
    recompute = per_block if ckpt else 0
    adamw, grads = 2 * trainable, trainable
    # start of backward: every saved activation, plus the loss's buffers or, a little later, the last block's
    # gradients (and, with checkpointing, its rebuilt activations); the head's dW stays from then on
    start_of_backward = weights + adamw + activations + max(loss, head_grad + recompute + workspace)
    end_of_backward = weights + adamw + grads + per_block + workspace  # block 0: saved or rebuilt, all grads made
    optimizer_step = weights + grads + adamw
    runtime = 0 if str(device).startswith("cuda") else CPU_RUNTIME_BYTES
    peak = max(start_of_backward, end_of_backward, optimizer_step) + runtime
    return MemoryEstimate(weights, grads, adamw, activations, loss, workspace, recompute, runtime, peak)


def peak_memory_bytes(device):
    """CUDA: the peak bytes of live tensors since the last reset. Elsewhere: this process's peak resident set size
    (no per-tensor counter exists on CPU; subtract the peak before the model to get what training added)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()  # of this address space: not a parent's peak carried over exec (tools/resident.py)


# ---- CPU: resident memory that follows the tensors ----------------------------------------------------------------
# glibc's malloc serves a block below its mmap threshold from its heap and keeps it there after free(); the threshold
# starts at 128 KiB and rises to the size of each mmapped block freed (up to 32 MiB). A training step allocates and
# frees (B, T, C) activations of a few MB to tens of MB in a changing order, so after the first steps they come from
# the heap, and the holes they leave are reused only by blocks that fit: the process's peak RSS grows past the bytes
# of live tensors (GPT-2 124M LoRA, B=4, T=1024, bench/memory.py: 3.64 GB resident for 3.30 GB predicted; 1.77 GB
# for 1.13 GB with activation checkpointing). A fixed threshold makes every block of that size or more an mmap of its
# own, given back to the OS on free (3.31 GB and 1.05 GB); the price is fresh zeroed pages for each large tensor.
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h); a value set by mallopt also stops the rise
CPU_MMAP_THRESHOLD = 64 * 1024
GLIBC_MMAP_CEILING = 32 * 2 ** 20  # the largest threshold glibc takes on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)


def glibc():
    """The C library when it is glibc (it has mallopt), else None."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def set_cpu_mmap_threshold(nbytes=CPU_MMAP_THRESHOLD):
    """Fix glibc's mmap threshold at `nbytes` (Linux with glibc); True when set, False where there is no glibc."""
    libc = glibc()
    return libc is not None and bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))
