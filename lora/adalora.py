"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form, whose ranks move during training to the layers that need them.

LoRA gives every adapted layer the same rank r. AdaLoRA starts every layer at init_r and prunes to an average of
target_r, keeping the singular values that matter most, wherever they are:

    dW = P diag(lambda) Q * alpha / init_r      P = lora_B (out, r)   lambda = lora_E (r, 1)   Q = lora_A (r, in)

Pruning a triplet (P[:, i], lambda_i, Q[i]) is setting lambda_i = 0; P and Q stay. Three pieces make it work:
  - an orthogonality regulariser keeps P and Q near orthonormal, so that dropping lambda_i removes one direction
    and disturbs the others little: R = mean over layers of ||Q Q^T - I||_F and ||P^T P - I||_F, added to the loss
    times orth_reg_weight;
  - an importance score per triplet: each entry's sensitivity |w * dL/dw|, smoothed over steps (EMA, beta1), times
    its uncertainty (EMA of its deviation from that average, beta2); triplet score = s(lambda_i) + mean s(Q[i, :])
    + mean s(P[:, i]);
  - a budget schedule: the total number of kept triplets falls from init_r * layers to target_r * layers, cubically,
    between step tinit and total_step - tfinal; every deltaT steps the lowest-scoring triplets are masked to fit it.
After total_step - tfinal the ranks are fixed (rank_pattern) and training continues on the chosen triplets.
PEFT format: lora_A, lora_B, lora_E (no ".weight"), pruned to rank_pattern, which adapter_config.json records.
Call `allocator.update_and_allocate(model, step)` after each optimizer step (before zero_grad), as with PEFT.
"""
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from lora.inject import _find_targets, lora_layers
from model.modules import collapse_names
from lora.layer import LoRALinear
from tools.errors import UserError


@dataclass
class AdaLoRAConfig:
    init_r: int = 12  # every layer's rank at the start
    target_r: int = 8  # the average rank at the end
    alpha: float = 8.0  # PEFT's lora_alpha: dW is scaled by alpha / init_r
    dropout: float = 0.0
    targets: tuple | list | str = ("c_attn",)
    tinit: int = 0  # steps before pruning starts
    tfinal: int = 0  # steps at the end with the ranks fixed
    deltaT: int = 1  # prune every deltaT steps
    beta1: float = 0.85  # EMA of the sensitivity
    beta2: float = 0.85  # EMA of the uncertainty
    orth_reg_weight: float = 0.5
    total_step: int = 0  # the run's optimizer steps: required
    rank_pattern: dict | None = field(default=None)  # "<module>.lora_E" -> [kept?] x init_r, once pruning started

    def __post_init__(self):
        if not (isinstance(self.init_r, int) and self.init_r > 0 and isinstance(self.target_r, int)
                and 0 < self.target_r <= self.init_r):
            raise UserError(f"AdaLoRAConfig: need 0 < target_r <= init_r, got target_r={self.target_r!r}, "
                             f"init_r={self.init_r!r}")
        if not (isinstance(self.total_step, int) and self.total_step > 0):
            raise UserError(f"AdaLoRAConfig.total_step must be the run's number of steps (> 0), "
                             f"got {self.total_step!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise UserError(f"AdaLoRAConfig: tinit={self.tinit}, tfinal={self.tfinal} leave no pruning phase in "
                             f"total_step={self.total_step}; lower them")
        if self.orth_reg_weight < 0 or self.deltaT < 1 or not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise UserError("AdaLoRAConfig: need orth_reg_weight >= 0, deltaT >= 1, 0 < beta1, beta2 < 1")


class SVDLinear(LoRALinear):
    """A frozen nn.Linear plus P diag(lambda) Q * alpha / init_r. A LoRALinear whose update has a diagonal in the
    middle: merging, disabling and merge_and_unload work as for LoRA (through delta_weight)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, r, alpha, dropout)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=self.weight.device, dtype=self.weight.dtype))  # lambda
        self.ranknum = float(r)  # init_r, even after pruning (as PEFT's ranknum)
        self.scaling = alpha if alpha > 0 else float(r)
        nn.init.normal_(self.lora_A, std=0.02)  # PEFT's init: P, Q ~ N(0, 0.02), lambda = 0, so dW = 0
        nn.init.normal_(self.lora_B, std=0.02)

    def set_mode(self, mode):
        if mode != "split":
            raise UserError("AdaLoRA layers compute in split mode only")
        self.mode = mode

    def delta_weight(self):
        dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
        PdQ = self.lora_B.to(dtype) @ (self.lora_A.to(dtype) * self.lora_E.to(dtype))  # (out, r) @ (r, in)
        return PdQ * self.scaling / (self.ranknum + 1e-5)  # (out, in)

    def forward(self, x):
        if self.merged or not self.enabled:
            return super().forward(x)
        out = nn.functional.linear(x, self.weight, self.bias)  # (..., out)
        x_Q = nn.functional.linear(self.lora_dropout(x), self.lora_A * self.lora_E)  # (..., r): Q x, times lambda
        return out + nn.functional.linear(x_Q, self.lora_B) * (self.scaling / (self.ranknum + 1e-5))

    def prune(self, keep):
        """Keep only the triplets where `keep` (r,) is True (for saving and loading rank patterns)."""
        keep = torch.as_tensor(keep, dtype=torch.bool, device=self.lora_A.device)
        self.lora_A = nn.Parameter(self.lora_A.data[keep], requires_grad=self.lora_A.requires_grad)  # (r', in)
        self.lora_E = nn.Parameter(self.lora_E.data[keep], requires_grad=self.lora_E.requires_grad)  # (r', 1)
        self.lora_B = nn.Parameter(self.lora_B.data[:, keep], requires_grad=self.lora_B.requires_grad)  # (out, r')
        self.r = int(keep.sum())

    def extra_repr(self):
        return super().extra_repr() + f", ranknum={self.ranknum:g}"


def adalora_layers(model):
    return [(n, m) for n, m in lora_layers(model) if isinstance(m, SVDLinear)]


def apply_adalora(model: nn.Module, config: AdaLoRAConfig) -> nn.Module:
    """Replace each targeted nn.Linear by an SVDLinear of rank init_r (in place), freeze the rest; returns model."""
    if lora_layers(model):
        raise UserError(f"{type(model).__name__} already has LoRA layers; apply one adapter")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in _find_targets(model, config.targets):
        parent_name, _, child_name = name.rpartition(".")
        layer = SVDLinear(model.get_submodule(name), config.init_r, config.alpha, config.dropout)
        setattr(model.get_submodule(parent_name), child_name, layer)
    model.adalora_config = replace(config)
    return model


def orth_regularization(model):
    """mean over every P and Q of ||P^T P - I||_F, ||Q Q^T - I||_F (PEFT's AdaLoraModel.forward adds it)."""
    terms = []
    for _, layer in adalora_layers(model):
        for gram in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):  # (r, r) each
            terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.size(0), device=gram.device, dtype=gram.dtype)))
    return torch.stack(terms).mean()


# ---- the rank budget ---------------------------------------------------------------------------------------------
class RankAllocator:
    """Importance scores and the budget schedule (PEFT's RankAllocator and AdaLoraModel.update_and_allocate)."""

    def __init__(self, model, config: AdaLoRAConfig):
        self.config, self.layers = config, adalora_layers(model)
        self.init_budget = sum(layer.lora_A.size(0) for _, layer in self.layers)
        self.target_budget = config.target_r * len(self.layers)
        self.reset()

    def reset(self):
        self.exp_avg_ipt, self.exp_avg_unc = {}, {}  # "<module>.lora_X" -> EMA tensors, the parameter's shape

    def budget_schedule(self, step):
        """(triplets to keep, whether to mask at this step): init_budget until tinit, then a cubic decay to
        target_budget at total_step - tfinal, masking every deltaT steps; target_budget after."""
        c = self.config
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        progress = (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)  # 0 -> 1
        budget = int((self.init_budget - self.target_budget) * (1 - progress) ** 3 + self.target_budget)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def update_importance(self):
        """Sensitivity |w * grad| per entry, its EMA (beta1), and the EMA of |sensitivity - EMA| (beta2)."""
        b1, b2 = self.config.beta1, self.config.beta2
        for name, layer in self.layers:
            for part in ("lora_A", "lora_E", "lora_B"):
                p, key = getattr(layer, part), f"{name}.{part}"
                ipt = (p * p.grad).abs()
                avg = self.exp_avg_ipt[key] = b1 * self.exp_avg_ipt.get(key, torch.zeros_like(p)) + (1 - b1) * ipt
                unc = self.exp_avg_unc.get(key, torch.zeros_like(p))
                self.exp_avg_unc[key] = b2 * unc + (1 - b2) * (ipt - avg).abs()

    def triplet_scores(self):
        """{module: (r,)}: s(lambda_i) + mean_j s(Q[i, j]) + mean_k s(P[k, i]), s = EMA sensitivity x uncertainty."""
        s = {k: self.exp_avg_ipt[k] * self.exp_avg_unc[k] for k in self.exp_avg_ipt}
        return {name: s[f"{name}.lora_E"].view(-1) + (s[f"{name}.lora_A"].mean(1) + s[f"{name}.lora_B"].mean(0))
                for name, _ in self.layers}

    @torch.no_grad()
    def mask_to_budget(self, budget):
        """Zero the lambda of the (init_budget - budget) lowest-scoring triplets over all layers; the rank pattern."""
        scores = self.triplet_scores()
        k = self.init_budget - budget
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values.item() if k > 0 else -float("inf")
        pattern = {}
        for name, layer in self.layers:
            keep = scores[name] > threshold  # (r,)
            layer.lora_E.masked_fill_(~keep[:, None], 0.0)
            pattern[f"{name}.lora_E"] = keep.tolist()
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self, pattern):
        for name, layer in self.layers:
            keep = torch.tensor(pattern[f"{name}.lora_E"], device=layer.lora_E.device)
            layer.lora_E.masked_fill_(~keep[:, None], 0.0)

    def update_and_allocate(self, model, step):
        """Once per optimizer step, after backward and before zero_grad. Records model.adalora_config.rank_pattern."""
        c, fixed_from = model.adalora_config, self.config.total_step - self.config.tfinal
        if step < fixed_from:
            self.update_importance()
            budget, mask_now = self.budget_schedule(step)
            if mask_now:
                c.rank_pattern = self.mask_to_budget(budget)
        elif step == fixed_from:  # the final allocation: target_budget, then the ranks stay
            c.rank_pattern = self.mask_to_budget(self.budget_schedule(step)[0])
            self.reset()
        else:
            self.mask_using_rank_pattern(c.rank_pattern)

    def state_dict(self):
        return {"exp_avg_ipt": self.exp_avg_ipt, "exp_avg_unc": self.exp_avg_unc}

    def load_state_dict(self, state):
        self.exp_avg_ipt, self.exp_avg_unc = dict(state["exp_avg_ipt"]), dict(state["exp_avg_unc"])


def ranks(model):
    """{module: rank in use} (triplets whose lambda is not masked), e.g. for a log line."""
    pattern = getattr(model, "adalora_config").rank_pattern
    return {name: (sum(pattern[f"{name}.lora_E"]) if pattern else layer.r) for name, layer in adalora_layers(model)}


def describe_ranks(model):
    by_rank = {}
    for name, r in ranks(model).items():
        by_rank.setdefault(r, []).append(name)
    return "; ".join(f"r={r}: {', '.join(collapse_names(names))}" for r, names in sorted(by_rank.items()))


# ---- PEFT's file format ------------------------------------------------------------------------------------------
def save_adalora_adapter(model, path, base_model_name_or_path=None):
    """adapter_config.json + adapter_model.safetensors as PEFT writes them: each layer pruned to its rank_pattern."""
    from lora.adapter import PREFIX, conv1d_names, write_adapter_files
    config = getattr(model, "adalora_config", None)
    if config is None:
        raise UserError(f"save_adalora_adapter: {type(model).__name__} has no AdaLoRA layers; apply_adalora first")
    tensors = {}
    for name, layer in adalora_layers(model):
        keep = torch.tensor(config.rank_pattern[f"{name}.lora_E"]) if config.rank_pattern else None
        if keep is not None and len(keep) != layer.r:  # already pruned (loaded from a pruned adapter)
            keep = None
        A, E, B = layer.lora_A.detach(), layer.lora_E.detach(), layer.lora_B.detach()
        if keep is not None:
            A, E, B = A[keep], E[keep], B[:, keep]
        tensors.update({f"{PREFIX}{name}.lora_A": A, f"{PREFIX}{name}.lora_E": E, f"{PREFIX}{name}.lora_B": B})
    targets = config.targets if isinstance(config.targets, str) else list(config.targets)
    peft_config = {
        "peft_type": "ADALORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "target_modules": targets, "fan_in_fan_out": bool(conv1d_names(model)),
        "bias": "none", "use_rslora": False, "modules_to_save": None, "init_lora_weights": True,
        "init_r": config.init_r, "target_r": config.target_r, "tinit": config.tinit, "tfinal": config.tfinal,
        "deltaT": config.deltaT, "beta1": config.beta1, "beta2": config.beta2,
        "orth_reg_weight": config.orth_reg_weight, "total_step": config.total_step,
        "rank_pattern": config.rank_pattern, "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True, "use_dora": False, "layers_to_transform": None, "layers_pattern": None,
        "alpha_pattern": {}}
    return write_adapter_files(path, peft_config, tensors)


def load_adalora_adapter(model, path):
    """Load a PEFT AdaLoRA adapter (ours or PEFT's) into `model` (which has no adapter yet), in place."""
    from lora.adapter import PREFIX, read_adapter_files
    config, tensors = read_adapter_files(path)
    if config.get("peft_type") != "ADALORA":
        raise UserError(f"{path}: peft_type={config.get('peft_type')!r}, not 'ADALORA'")
    for key in ("use_dora", "layers_to_transform", "modules_to_save", "alpha_pattern"):
        if config.get(key):
            raise UserError(f"{path}: AdaLoRA with {key}={config[key]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise UserError(f"{path}: bias={config['bias']!r} is not supported; only 'none'")
    targets = config["target_modules"]
    ours = AdaLoRAConfig(init_r=config["init_r"], target_r=config["target_r"], alpha=config["lora_alpha"],
                         dropout=config.get("lora_dropout", 0.0),
                         targets=targets if isinstance(targets, str) else tuple(sorted(targets)),
                         tinit=config["tinit"], tfinal=config["tfinal"], deltaT=config["deltaT"],
                         beta1=config["beta1"], beta2=config["beta2"], orth_reg_weight=config["orth_reg_weight"],
                         total_step=config["total_step"], rank_pattern=config.get("rank_pattern"))
    apply_adalora(model, ours)
    layers = dict(adalora_layers(model))
    expected = {f"{PREFIX}{name}.{part}" for name in layers for part in ("lora_A", "lora_E", "lora_B")}
    if set(tensors) != expected:
        unknown, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise UserError(f"{path}: tensors do not match this model's AdaLoRA layers: unexpected "
                         f"{collapse_names(unknown)[:4]}, missing {collapse_names(missing)[:4]}")
    with torch.no_grad():
        for name, layer in layers.items():
            if ours.rank_pattern is not None:
                layer.prune(ours.rank_pattern[f"{name}.lora_E"])
            for part in ("lora_A", "lora_E", "lora_B"):
                t, param = tensors[f"{PREFIX}{name}.{part}"], getattr(layer, part)
                if t.shape != param.shape:
                    raise UserError(f"{path}: {name}.{part} has shape {tuple(t.shape)}, the model expects "
                                     f"{tuple(param.shape)}: another base model, or a rank_pattern that does not fit")
                param.copy_(t)
    return model
