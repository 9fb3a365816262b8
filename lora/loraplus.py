"""LoRA+ (Hayou et al., 2024): give lora_B a larger learning rate than lora_A.

In y = x W^T + s (x A^T) B^T the two factors are not symmetric: for wide layers, the feature-learning analysis
of the paper shows that one learning rate for both is inefficient, and that B should learn about 2^4 times
faster than A. LoRA+ is therefore only an optimizer change, with one number:

    lr(lora_A) = lr            lr(lora_B) = loraplus_lr_ratio * lr

LoRAConfig(loraplus_lr_ratio=16) turns it on; model.configure_optimizers (training/optim.py) then builds these
groups, with PEFT's create_loraplus_optimizer grouping: lora_B and every 1-D trainable tensor (DoRA magnitudes,
norm gains and biases of modules_to_save) get lr * ratio, everything else (lora_A, matrices of modules_to_save)
gets lr. Weight decay follows our usual rule (matrices only); PEFT also decays DoRA's magnitude vector, which we
do not (shrinking m shrinks the layer's output). Each group carries "lr_scale" (1 or the ratio): train.py's
schedule sets group["lr"] = lr * group["lr_scale"], so the ratio holds through warmup and decay.
"""


def loraplus_param_groups(model, weight_decay, ratio):
    """AdamW parameter groups for LoRA+ over the trainable parameters of `model`."""
    groups = {"A": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():  # named_parameters yields a tied tensor once
        if not p.requires_grad:
            continue
        if name.endswith("lora_B") or p.dim() < 2:
            groups["B" if p.dim() >= 2 else "B_no_decay"].append(p)
        else:
            groups["A"].append(p)
    return [{"params": groups["A"], "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": groups["B"], "weight_decay": weight_decay, "lr_scale": ratio},
            {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr_scale": ratio}]
