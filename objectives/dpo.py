"""objective='dpo': preference tuning, with the adapter switched off as its own reference model.

Direct Preference Optimization (Rafailov et al., 2023) learns from pairs (prompt x, chosen y_w, rejected y_l)
without a reward model. The policy pi's implicit reward of an answer is how much likelier pi makes it than a
frozen reference pi_ref:  r(y) = beta * (log pi(y|x) - log pi_ref(y|x)),  and the loss pushes r(y_w) above r(y_l):
    sigmoid  -log sigmoid(beta h)         h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))
    ipo      (h - 1 / (2 beta))^2         (Azar et al., 2023: a target margin instead of an unbounded one)
    hinge    max(0, 1 - beta h)           (SLiC)
label_smoothing eps (conservative DPO) trusts each label with probability 1 - eps: the sigmoid loss becomes
(1 - eps) * -log sigmoid(beta h) + eps * -log sigmoid(-beta h). log pi(y|x) is the sum of the log-probs of the
answer's tokens (the mask from prepare_sft.py), as in the paper and TRL (TRL's IPO averages them instead).

With an adapter the reference is free: pi_ref is the same network with the adapter switched off (its row's
disabled(), adapters/), so no second model sits in memory. At step 0, B = 0 makes pi = pi_ref: h = 0 and the
sigmoid loss is ln 2. That holds for every method whose switched-off state is the starting model: not for PiSSA
(its base is a residual) nor modules_to_save (trained copies), which the settings check refuses.
    adapter_off  the reference forward runs in the same step, switched off and under no_grad (adapter runs)
    precompute   one pass over the pairs before training; the log-probs are stored next to the data (any run)
    copy         a frozen copy of the starting model (full fine-tuning; costs a second model's memory)
A micro-batch of B pairs is 2B rows, chosen [0, B) then rejected [B, 2B), run through the model together (as TRL).
"""
import torch
import torch.nn.functional as F

from objectives.objective import Objective
from tools.errors import UserError

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
        raise UserError(f"dpo_loss={loss_type!r}: use one of {', '.join(LOSSES)}")
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
    """(2B,) the reference's sequence log-probs of a micro-batch: the model with its adapter switched off (through
    its row in adapters.METHODS), a frozen copy, or the precomputed values (stored (2B,), looked up by the loader)."""
    if reference == "precompute":
        return stored
    if reference == "copy":
        return sequence_logps(ref_model(x)[0], y)
    from adapters import method_of
    with method_of(model).disabled(model):
        return sequence_logps(model(x)[0], y)


# ---- the objective ------------------------------------------------------------------------------------------------
class DPO(Objective):
    name = "dpo"
    settings = ("dpo_beta", "dpo_loss", "dpo_label_smoothing", "dpo_reference")
    rows_per_item = 2  # a pair is a chosen and a rejected row
    full_logits = True  # sequence_logps reads the full logits

    @classmethod
    def defaults(cls, c):
        """dpo_reference='auto': the method switched off when that gives the starting model, else precomputed."""
        if c["dpo_reference"] != "auto":
            return {}
        from adapters import method
        free = method(c["peft_method"]).lacks("adapter_off", c) is None
        return {"dpo_reference": "adapter_off" if free else "precompute"}

    @classmethod
    def needs(cls, c):
        return [("adapter_off", "dpo_reference='adapter_off'")] if c["dpo_reference"] == "adapter_off" else []

    @classmethod
    def refuse(cls, c):
        if c["dpo_reference"] == "copy" and c["peft_method"] != "full":
            return (f"dpo_reference='copy' with peft_method={c['peft_method']!r}: a frozen copy of the whole model is "
                    f"for full fine-tuning; use dpo_reference='adapter_off' or 'precompute'")
        if c["dpo_loss"] != "sigmoid" and c["dpo_label_smoothing"] != 0:
            return (f"dpo_label_smoothing={c['dpo_label_smoothing']} with dpo_loss={c['dpo_loss']!r}: label "
                    f"smoothing is for the sigmoid loss; use dpo_loss='sigmoid' or dpo_label_smoothing=0")
        if c["parallel"] == "fsdp":
            return "objective='dpo' with parallel='fsdp' is not supported: use parallel='ddp'"
        return None

    def make_loaders(self):
        from loaders.dpo import DPOLoader
        c, r = self.c, self.run
        return tuple(DPOLoader(c["data_dir"], c["batch_size"], c["block_size"], r.rank, r.world_size, split,
                               c["seed"]) for split in ("train", "val"))

    def start(self, model, base=None, base_fingerprint=None, resuming=False, loaders=(), out_dir="", **_):
        """Set up the reference: the method switched off (nothing to do), a frozen copy, or precomputed log-probs."""
        self.model, self.ref_model, reference = model, None, self.c["dpo_reference"]
        if reference == "copy":  # the starting model: this one before any step, or reloaded from `base` on resume
            self.ref_model = self.starting_copy(model, base, base_fingerprint, resuming, out_dir, "dpo_reference='copy'",
                                                "start it again with dpo_reference='precompute'")
        elif reference == "precompute":
            self.precompute(model, base_fingerprint, resuming, loaders, out_dir)
        elif self.run.master:
            print("dpo reference: the model with its adapter switched off (no second model in memory)")

    def precompute(self, model, base_fingerprint, resuming, loaders, out_dir):
        from adapters import method_of
        from loaders.dpo import precompute_reference, reference_path
        # the starting model: the adapter switched off where that gives it, else the model itself before any step
        # (full fine-tuning; PiSSA, whose switched-off base is a residual; modules_to_save, trained copies)
        row = method_of(model)
        fresh = row.lacks("adapter_off", self.c) is not None

        def starting_logps(x, y):
            with self.run.autocast:
                return reference_logps(x, y, "copy" if fresh else "adapter_off", model, model)

        path = reference_path(self.c["data_dir"], base_fingerprint)
        if resuming and fresh and not path.exists():
            raise UserError(f"resume of {out_dir}: its reference log-probs {path} are gone, and with "
                            f"peft_method={row.name!r} they cannot be recomputed from trained weights; start the run "
                            f"again")
        model.eval()
        precompute_reference(loaders, starting_logps, path, self.run.device, self.run.master, self.run.distributed)
        model.train()

    def count(self, batch):
        return batch[1].new_tensor(batch[1].size(0) // 2)  # pairs

    def loss(self, model, batch):
        """The summed DPO loss of the micro-batch's pairs and the sums of TRL's metrics; x, y (2B, L)."""
        x, y, stored = batch
        # the reference first: its logits are freed before the policy's forward keeps activations for backward,
        # so the step's peak memory is the policy's, as in an SFT step on the same rows (bench/dpo_memory.py)
        ref = reference_logps(x, y, self.c["dpo_reference"], self.model, self.ref_model, stored)  # (2B,) no grad
        logps = sequence_logps(model(x)[0], y)  # (2B,) the policy, with gradients when training
        c = self.c
        losses, chosen_rewards, rejected_rewards = dpo_loss(logps, ref, c["dpo_beta"], c["dpo_loss"],
                                                            c["dpo_label_smoothing"])
        return losses.sum(), metric_sums(losses, chosen_rewards, rejected_rewards, logps)

    def metrics(self, sums, prefix=""):
        return metric_means(sums, prefix)

    def describe(self, record):
        return (f"val loss {record['val_loss']:.4f}, reward accuracy {record['eval_rewards/accuracies']:.4f}, "
                f"margin {record['eval_rewards/margins']:.4f}")
