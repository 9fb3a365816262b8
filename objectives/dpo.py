"""DPO: preference tuning with the LoRA adapter switched off as its own reference model.

Direct Preference Optimization (Rafailov et al., 2023) learns from pairs (prompt x, chosen y_w, rejected y_l)
without a reward model. The policy pi's implicit reward of an answer is how much likelier pi makes it than a
frozen reference pi_ref:  r(y) = beta * (log pi(y|x) - log pi_ref(y|x)),  and the loss pushes r(y_w) above r(y_l):
    sigmoid  -log sigmoid(beta h)         h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
    ipo      (h - 1 / (2 beta))^2         (Azar et al., 2023: a target margin instead of an unbounded one)
    hinge    max(0, 1 - beta h)           (SLiC)
label_smoothing eps (conservative DPO) trusts each label with probability 1 - eps: the sigmoid loss becomes
(1 - eps) * -log sigmoid(beta h) + eps * -log sigmoid(-beta h). log pi(y|x) is the sum of the log-probs of the
answer's tokens (the mask from prepare_sft.py), as in the paper and TRL (TRL's IPO averages them instead).

With LoRA the reference is free: pi_ref is the same network with the adapter switched off (lora_disabled), so
no second model sits in memory. At step 0, B = 0 makes pi = pi_ref: h = 0 and the sigmoid loss is ln 2.
    adapter_off  the reference forward runs in the same step, under lora_disabled and no_grad (LoRA runs)
    precompute   one pass over the pairs before training; the log-probs are stored next to the data (any run)
    copy         a frozen copy of the starting model (full fine-tuning; costs a second model's memory)
A micro-batch of B pairs is 2B rows, chosen [0, B) then rejected [B, 2B), run through the model together (as TRL).
"""

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "hinge")
REFERENCES = ("adapter_off", "precompute", "copy")
# TRL's metric names; the val ones are prefixed eval_ (as TRL's evaluate() logs them)
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def sequence_logps(logits, y):
    """(N,) log p(answer | prompt) of each row: the sum over its targets (y != -1) of log p(y_t | x_<=t).
    logits (N, T, V), y (N, T) with -1 off the answer."""
    token_nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none")  # (N*T,)
    return -token_nll.view(y.shape).sum(dim=1)  # (N,); an ignored position contributes 0


def dpo_loss(logps, ref_logps, beta=0.1, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair losses (B,) and rewards from the 2B sequence log-probs of the policy and the reference
    (chosen [0, B), rejected [B, 2B))."""
    B = logps.size(0) // 2
    chosen_logratio = logps[:B] - ref_logps[:B]  # (B,) log pi(y_w)/pi_ref(y_w)
    rejected_logratio = logps[B:] - ref_logps[B:]  # (B,)
    h = chosen_logratio - rejected_logratio  # (B,) the preference margin in log space
    if loss_type == "sigmoid":  # -log sigmoid is the Bradley-Terry likelihood of the label, and of its flip
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"dpo_loss={loss_type!r}: use one of {', '.join(LOSSES)}")
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def metric_sums(losses, chosen_rewards, rejected_rewards, logps):
    """(len(METRICS) + 1,) sums over the pairs of a micro-batch, then the pair count: summed over micro-steps and
    all-reduced over ranks, they divide into the means of the whole step. A tie (step 0 of adapter_off, where
    every reward is 0) counts as half right, so accuracy starts at 0.5 (TRL counts it wrong)."""
    B = losses.size(0)
    margins = chosen_rewards - rejected_rewards  # (B,)
    right = (margins > 0).float() + 0.5 * (margins == 0).float()  # (B,)
    per_pair = [losses.detach(), chosen_rewards, rejected_rewards, right, margins, logps[:B].detach(),
                logps[B:].detach()]
    return torch.stack([t.float().sum() for t in per_pair] + [torch.tensor(float(B), device=losses.device)])


def metric_means(sums, prefix=""):
    """{name: mean} from metric_sums summed over a step (or an evaluation)."""
    values = (sums[:-1] / sums[-1]).tolist()
    return {prefix + name: value for name, value in zip(METRICS, values)}


@torch.no_grad()
def reference_logps(x, y, reference, model=None, ref_model=None, stored=None):
    """(2B,) the reference's sequence log-probs of a micro-batch: the model with its adapter off, a frozen copy,
    or the precomputed values (stored (2B,), looked up by the loader)."""
    if reference == "precompute":
        return stored
    if reference == "copy":
        return sequence_logps(ref_model(x)[0], y)
    from lora import lora_disabled
    with lora_disabled(model):
        return sequence_logps(model(x)[0], y)
