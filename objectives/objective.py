"""What an objective is to train.py: one row of OBJECTIVES (objectives/__init__.py).

train.py never asks which objective it runs. It asks the row for its data loaders, lets it prepare the model once
(DPO's reference), and then, for every micro-batch, asks for three things:
    prepare(model, batch)  the batch the loss reads (GRPO: completions sampled and rewarded; others: the same)
    count(batch)        how many items the batch holds (target tokens, preference pairs, completions ...)
    loss(model, batch)  the loss summed over those items, and the sums of the objective's own metrics (or None)
The step's gradient is then the mean over every item of the step: train.py adds up count() over the step's
micro-batches and all ranks, and back-propagates loss_sum * world_size / step_count for each micro-batch (DDP
averages the ranks' gradients, hence world_size). One rule for every objective: micro-batches that hold different
numbers of items (SFT's answer tokens) are weighted by what they hold.

    name                  train.py's `objective`
    settings              the train.py settings only this objective reads (given with another: refused)
    make_loaders()        (train_loader, val_loader); batches are tuples whose first two items are x, y
    start(model, ...)     once, after the model and its adapter exist and before the optimizer
    metrics(sums, prefix) {name: mean} from the summed metric sums of a step or an evaluation
    evaluate(model)       {'val_loss': ..., more}: over the val split, all ranks (GRPO: {'eval_reward'})
    needs(config)         [(capability, the setting that asks for it)] of the PEFT method (adapters/method.py)
    refuse(config)        a one-line message for settings this objective cannot take together, or None
    defaults(config)      values of 'auto' settings, resolved before the settings are checked
"""
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tools.errors import UserError


@dataclass
class Run:
    """What an objective may read of the run around it."""
    config: dict  # every setting of the run
    device: str
    autocast: Any  # the context the forward passes run in (bf16 autocast on CUDA, else a no-op)
    rank: int = 0
    world_size: int = 1
    master: bool = True  # rank 0: prints and writes

    @property
    def distributed(self):
        return self.world_size > 1 or dist.is_initialized()


class Objective:
    name = ""
    settings = ()
    rows_per_item = 1  # rows of a micro-batch per item of batch_size (DPO: chosen and rejected)
    full_logits = False  # its loss reads the full (B, T, V) logits, not the chunked loss (memory estimate)

    def __init__(self, run: Run):
        self.run, self.c = run, run.config

    # ---- the settings (class methods: checked before anything is built) ---------------------------------------
    @classmethod
    def defaults(cls, config):
        return {}

    @classmethod
    def needs(cls, config):
        return []

    @classmethod
    def refuse(cls, config):
        return None

    # ---- data ------------------------------------------------------------------------------------------------
    def make_loaders(self):
        raise NotImplementedError

    def check(self, model, loaders, base=None):
        """Refuse data the model cannot read: rows longer than its positions, token ids past its vocabulary or of
        another tokenizer than the model's (base: what the model was loaded from; None: from scratch)."""
        block_size = self.c["block_size"]
        if block_size > model.max_seq_len:
            virtual = f" (after {model.num_virtual_tokens} virtual tokens)" if model.num_virtual_tokens else ""
            raise UserError(f"block_size={block_size} is longer than the model's {model.max_seq_len} positions"
                            f"{virtual}")
        for loader in loaders:
            loader.check_vocab(model.config.vocab_size)
            if hasattr(loader, "check_tokenizer"):  # data that records its tokenizer (prepare_sft.py, fineweb.py)
                loader.check_tokenizer(base)

    def start(self, model, **run_state):
        """Prepare what the objective needs beyond the model (DPO's reference). run_state: base, base_fingerprint,
        resuming, loaders, out_dir."""

    def starting_copy(self, model, base, base_fingerprint, resuming, out_dir, asker, instead):
        """A frozen copy of the starting model, for a reference: this model before any step, or reloaded from
        `base` on resume (refused if it changed since). asker: the setting that wants it; instead: what to do when a
        run from scratch has no base to reload."""
        import copy
        if resuming:
            from training.checkpoint import fingerprint, load_base
            if base is None:
                raise UserError(f"resume of {out_dir}: {asker} needs the starting model, and a run from scratch has "
                                 f"none to reload; {instead}")
            ref_model = load_base(base)
            if fingerprint(ref_model) != base_fingerprint:
                raise UserError(f"resume of {out_dir}: its starting model {base} has changed since the run began; "
                                 f"the reference would differ. Restore it, or start a new run")
        else:
            ref_model = copy.deepcopy(model)
        ref_model.requires_grad_(False).eval().to(self.run.device)
        if self.run.master:
            copy_mib = sum(p.numel() * p.element_size() for p in ref_model.parameters()) / 2**20
            print(f"{self.name} reference: a frozen copy of the model, {copy_mib:,.1f} MiB more memory")
        return ref_model

    def prepare(self, model, batch):
        """The loader's micro-batch made into what count() and loss() read, before the step's count is taken
        (GRPO samples and rewards its completions here, with `model` unwrapped). By default the batch itself."""
        return batch

    # ---- the step --------------------------------------------------------------------------------------------
    def count(self, batch):
        """(,) the number of items the micro-batch's loss sums over: its target tokens."""
        return (batch[1] != -1).sum()

    def forward_loss(self, model, batch):
        """The model's mean loss over the batch's targets."""
        return model(batch[0], batch[1])[1]

    def loss(self, model, batch):
        """(loss summed over the batch's items, metric sums or None)."""
        return self.forward_loss(model, batch) * self.count(batch), None

    def metrics(self, sums, prefix=""):
        return {}

    # ---- evaluation ------------------------------------------------------------------------------------------
    def eval_batches(self, val_loader):
        return val_loader.eval_batches(self.c["eval_iters"])

    @torch.no_grad()
    def evaluate(self, model, val_loader):
        """{'val_loss': the mean loss over every val item of all ranks (up to eval_iters batches per rank)}, plus
        the objective's metrics prefixed eval_."""
        model.eval()
        totals, metric_sums = torch.zeros(2, device=self.run.device), None  # summed loss, items
        for batch in self.eval_batches(val_loader):
            batch = tuple(t.to(self.run.device) if t is not None else None for t in batch)
            with self.run.autocast:
                loss_sum, sums = self.loss(model, batch)
            totals += torch.stack([loss_sum.detach().float(), self.count(batch).float()])
            if sums is not None:
                metric_sums = sums if metric_sums is None else metric_sums + sums
        if self.run.distributed:
            dist.all_reduce(totals)
            if metric_sums is not None:
                dist.all_reduce(metric_sums)
        model.train()
        record = {"val_loss": (totals[0] / totals[1]).item()}
        if metric_sums is not None:
            record.update(self.metrics(metric_sums, prefix="eval_"))
        return record

    def describe(self, record):
        """The evaluation's line for the log."""
        return f"val loss {record['val_loss']:.4f}"

    def extra_evaluations(self, model, step, last_step):
        """More evaluations, on their own intervals (SFT's exact match): {name: value}."""
        return {}
