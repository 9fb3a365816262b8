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
    return 6 * trainable + 4 * frozen + 12 * n_layer * n_embd * seq_len


# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, without sparsity
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
                   "A100": 312e12, "A10G": 70e12, "L4": 121e12, "L40S": 362e12, "RTX 4090": 165e12,
                   "RTX 3090": 71e12, "V100": 125e12}


def device_peak_flops(device):
    """The bf16 peak of a CUDA device (for MFU), or None when the device is not in the table."""
    import torch
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS.items():  # first match wins: specific names come first
        if key in name:
            return peak
    return None
