"""The AdamW setup shared by GPT and LLaMA (and any model whose parameters follow the same convention).

Weight decay pulls weights toward zero. It makes sense for the matrices that mix features (Linear weights,
embeddings: dim >= 2) but not for biases and norm gains (dim < 2), which only shift or scale and are few.
"""
import torch


def configure_adamw(model, weight_decay, learning_rate, betas, device_type, verbose=True):
    """AdamW over model's parameters with requires_grad: decay on dim >= 2, none on dim < 2.

    Frozen parameters (a LoRA model's base weights) are left out, so they get no optimizer state. With LoRA+
    (model.lora_config.loraplus_lr_ratio != 1) the groups are lora/loraplus.py's. Every group has "lr_scale", the
    factor by which its learning rate follows the schedule's.
    """
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields a tied tensor once
    decay_params = [p for p in params if p.dim() >= 2]
    nodecay_params = [p for p in params if p.dim() < 2]
    if verbose:
        print(f"num decayed parameter tensors: {len(decay_params)}, "
              f"with {sum(p.numel() for p in decay_params):,} parameters")
        print(f"num non-decayed parameter tensors: {len(nodecay_params)}, "
              f"with {sum(p.numel() for p in nodecay_params):,} parameters")
    groups = [{"params": decay_params, "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": nodecay_params, "weight_decay": 0.0, "lr_scale": 1.0}]
    ratio = getattr(getattr(model, "lora_config", None), "loraplus_lr_ratio", 1.0)
    if ratio != 1.0:
        from lora.loraplus import loraplus_param_groups
        groups = loraplus_param_groups(model, weight_decay, ratio)
        if verbose:
            print(f"LoRA+: lora_B and 1-D tensors learn at {ratio:g} x the learning rate")
    # the fused kernel does the whole update in one pass instead of a loop of elementwise ops per tensor: on CUDA,
    # and on CPU since torch 2.4, our minimum (measured in bench/train_defaults.py, results in bench/results/)
    use_fused = device_type in ("cuda", "cpu")
    extra = dict(fused=True) if use_fused else dict()
    if verbose:
        print(f"using fused AdamW: {use_fused}")
    for group in groups:
        group["lr"] = learning_rate * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)
