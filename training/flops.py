"""How many FLOPs a training step costs, for tokens/s -> FLOP/s -> MFU.

A matmul with a weight of N parameters costs 2N FLOPs per token forward (a multiply and an add each).
Backward costs 2N for the gradient w.r.t. the input (dx = dy W) and, if W is trainable, another 2N
for the gradient w.r.t. the weight (dW = dy^T x). So per token:
    trainable weight: 6N        frozen weight (LoRA's base): 4N
That is why a LoRA step can be at most ~2/3 the cost of a full step: the weight-gradient GEMMs vanish.
Attention (q k^T and att v) has no weights: 4 * n_layer * C * T forward, twice that backward,
12 * n_layer * C * T in all (the PaLM paper's count, which ignores that a causal mask halves it).
"""


def flops_per_token(model, seq_len, n_layer, n_embd):
    """Training FLOPs per token for `model`: 6 per trainable, 4 per frozen matmul parameter, plus attention.

    Position embeddings are a lookup, not a matmul, and are left out (named `wpe`). The token embedding is
    counted because, tied to lm_head, it is the largest matmul of a GPT. Tied tensors count once.
    """
    trainable = frozen = 0
    for name, p in model.named_parameters():  # named_parameters yields a tied tensor once
        if name.endswith("wpe.weight"):
            continue
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    from quant import quantized_bytes  # a quantized base's weights are buffers: frozen matmuls all the same
    frozen += quantized_bytes(model)[1]
    return 6 * trainable + 4 * frozen + 12 * n_layer * n_embd * seq_len


# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets, for MFU.
# Matched against torch.cuda.get_device_name in order: the more specific names come first.
PEAK_BF16_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    ("GH200", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", None),  # AWS's A10 variant, clocked lower; no official bf16 figure: no MFU rather than a wrong one
    ("A10", 125.0),
]


def peak_for_name(gpu_name):
    """Dense bf16 peak (FLOP/s) of a GPU by its torch.cuda.get_device_name, or None if not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in gpu_name:
            return tflops * 1e12 if tflops else None
    return None
