"""objective='grpo': reinforcement learning with verifiable rewards, Group Relative Policy Optimization.

GRPO (Shao et al., 2024, DeepSeekMath) is PPO without a value network. For each prompt q the policy pi samples a
group of G completions o_1..o_G; each gets a reward r_i from a verifier (objectives/rewards.py: is the answer
right?), and the group's own mean is the baseline:
    A_i = (r_i - mean(r)) / (std(r) + 1e-4)        std over the group, unbiased (as TRL)
    A_i =  r_i - mean(r)                           grpo_scale_rewards=False (Dr. GRPO: no difficulty bias)
Every token t of o_i shares A_i, and its loss is PPO's clipped surrogate plus a KL pull toward a reference:
    ratio_it = pi(o_it) / pi_old(o_it)
    l_it = -min(ratio_it A_i, clip(ratio_it, 1 - eps, 1 + eps) A_i) + beta k3_it
    k3_it = exp(d) - d - 1,  d = log pi_ref(o_it) - log pi(o_it)
k3 (Schulman's estimator of KL(pi || pi_ref) from samples of pi) is >= 0 since e^d >= 1 + d, and 0 exactly where
pi = pi_ref. pi_old is the policy that sampled: with one optimizer step per round of sampling it is the current
policy, so ratio = exp(log pi - detach(log pi)) is 1 in value (clip_ratio 0) and its gradient is grad log pi: the
step is REINFORCE with the group's baseline (as TRL computes it at num_iterations=1). A group of equal rewards has
A = 0: no signal. Log-probs are of logits / grpo_temperature, the distribution that was sampled (TRL).

grpo_loss_type normalises the summed l_it as TRL does; loss() returns the sum and count() the divisor, and train.py
divides by the step's count over all micro-steps and ranks (objective.py):
    grpo      the mean over each completion's tokens, then over completions        count: completions
    dapo      every completion token of the step weighs the same                   count: completion tokens
    dr_grpo   the sum over tokens / (completions x grpo_max_new_tokens)            count: that constant

The reference: with an adapter, the model with it switched off (the same network in the same step, no second copy;
adapters/ rows with `adapter_off`); full fine-tuning, a frozen copy; grpo_beta=0, none (then `kl` is not logged,
as in TRL). Sampling runs in eval mode under no_grad (batch_generate: the KV cache, all B x G rows in one batch),
each completion from its own torch.Generator seeded by (seed, the prompt's draw, g): two processes sample what one
does, and a resume what the uninterrupted run did (loaders/grpo.py). The loss's forward is in train mode.

Memory: the loss needs the log-prob of each completion token only. The forward computes the head's logits from the
first completion position on (logits_to_keep: no (N, T, V) logits over the prompts, and 2 N P V C fewer FLOPs), the
n completion positions (n, V) are taken out before the softmax, and backward keeps one (n, V) float32 log-softmax:
for SmolLM2 (V = 49,152), 32 completions of 8 tokens are 50 MB.
"""
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from objectives.objective import Objective
from objectives.rewards import check, score

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
# TRL's names of what every step logs (kl only with grpo_beta > 0); eval steps log eval_reward
METRICS = ("reward", "reward_std", "frac_reward_zero_std", "kl", "entropy", "clip_ratio", "completions/mean_length",
           "completions/clipped_ratio")


def group_advantages(rewards, G, scale=True, eps=1e-4):
    """(advantages (N,), zero_std (N,) bool) from the rewards (N,) of N / G groups of G consecutive completions."""
    groups = rewards.float().view(-1, G)  # (N/G, G)
    std = groups.std(dim=1, keepdim=True)  # unbiased, as TRL's nanstd
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (std + eps)
    return advantages.flatten(), (std == 0).expand_as(groups).flatten()


def k3(logps, ref_logps):
    """Per-token k3 estimate of KL(pi || pi_ref) at tokens sampled from pi: exp(d) - d - 1, d = ref - logp."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def clipped_surrogate(logps, old_logps, advantages, epsilon):
    """(per-token loss, clipped) of PPO's objective: -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A); clipped marks
    the tokens whose ratio left the trust region in the direction A pushes it (TRL's clip_ratio/region)."""
    ratio = torch.exp(logps - old_logps)
    loss = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages)
    clipped = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon) & (advantages > 0))
    return loss, clipped


def aggregate(per_token, row, n_rows, loss_type):
    """The summed loss of a micro-batch, per loss type: 'grpo' sums each completion's mean over its tokens; 'dapo'
    and 'dr_grpo' sum every token (their divisors differ: count())."""
    if loss_type == "grpo":
        sums = per_token.new_zeros(n_rows).index_add(0, row, per_token)
        lengths = torch.bincount(row, minlength=n_rows).clamp(min=1)
        return (sums / lengths).sum()
    return per_token.sum()


def completion_logps(model, x, y, temperature):
    """(log-probs (n,), entropies (n,) without gradient, row of each (n,)) of the completion tokens (y != -1) under
    logits / temperature. Only the n completion positions' logits are kept (the module docstring's memory note)."""
    where = y != -1
    first = int(where.any(dim=0).nonzero()[0])  # the first position where a row predicts a completion token
    logits = model(x, logits_to_keep=x.size(1) - first)[0]  # (N, T - first, V): the head skips the prompts
    y, where = y[:, first:], where[:, first:]
    z = logits[where].float() / temperature  # (n, V); the padded logits are freed when `logits` goes
    logp = F.log_softmax(z, dim=-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(dim=-1)
    return logp.gather(1, y[where][:, None]).squeeze(1), entropy, where.nonzero()[:, 0]


def sampling_generator(seed, draw, g, device):
    """The torch.Generator of completion g of the prompt drawn `draw`-th in the run (independent streams)."""
    state = np.random.SeedSequence([seed, draw, g]).generate_state(2, np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


# ---- the objective ------------------------------------------------------------------------------------------------
class GRPO(Objective):
    name = "grpo"
    settings = ("grpo_num_generations", "grpo_max_new_tokens", "grpo_temperature", "grpo_top_k", "grpo_top_p",
                "grpo_epsilon", "grpo_beta", "grpo_loss_type", "grpo_scale_rewards", "grpo_reward")
    full_logits = True  # completion_logps reads the logits

    @property
    def rows_per_item(self):  # a prompt is G rows of prompt + completion
        return self.c["grpo_num_generations"]

    @classmethod
    def needs(cls, c):
        """The KL's reference is the method switched off; full fine-tuning keeps a frozen copy instead."""
        if c["grpo_beta"] > 0 and c["peft_method"] != "full":
            return [("adapter_off", f"grpo_beta={c['grpo_beta']}")]
        return []

    @classmethod
    def refuse(cls, c):
        if c["parallel"] == "fsdp":
            return "objective='grpo' with parallel='fsdp' is not supported: use parallel='ddp'"
        return None

    def make_loaders(self):
        from loaders.grpo import PromptLoader
        c, r = self.c, self.run
        return tuple(PromptLoader(c["data_dir"], c["batch_size"], c["block_size"], r.rank, r.world_size, split,
                                  c["seed"], max_new_tokens=c["grpo_max_new_tokens"]) for split in ("train", "val"))

    def start(self, model, base=None, base_fingerprint=None, resuming=False, loaders=(), out_dir="", **_):
        """The tokenizer that decodes completions, every target tried on the reward, and the KL's reference."""
        from tokenization import load_tokenizer
        c, header = self.c, loaders[0].header
        self.model, self.ref_model, self.pad_id = model, None, loaders[0].pad_id
        self.tok, self.eos_id = load_tokenizer(header["tokenizer"]), int(header["eos_id"])
        for loader in loaders:
            check(c["grpo_reward"], loader.targets)
        self.targets = loaders[0].targets
        if c["grpo_beta"] == 0:
            return
        if c["peft_method"] == "full":
            self.ref_model = self.starting_copy(model, base, base_fingerprint, resuming, out_dir,
                                                f"grpo_beta={c['grpo_beta']} with peft_method='full'",
                                                "start it again with --grpo_beta=0, or from a saved model "
                                                "(--init_from=<its folder>)")
        elif self.run.master:
            print("grpo reference: the model with its adapter switched off (no second model in memory)")

    # ---- sampling and rewards ----------------------------------------------------------------------------------
    def complete(self, model, prompts, lengths, generators=None, temperature=None):
        """Completions (lists of ids, each ending with EOS when it stopped) of every prompt row, and their text (cut
        at EOS), sampled in one batch in eval mode; temperature 0: greedy."""
        from model.generate import batch_generate
        c = self.c
        rows = [p[:n] for p, n in zip(prompts.tolist(), lengths.tolist())]
        temperature = c["grpo_temperature"] if temperature is None else temperature
        was_training = model.training
        model.eval()
        with torch.no_grad(), self.run.autocast:
            completions = batch_generate(model, rows, c["grpo_max_new_tokens"], temperature, c["grpo_top_k"] or None,
                                         c["grpo_top_p"] if c["grpo_top_p"] < 1 else None, self.eos_id, generators)
        model.train(was_training)
        texts = [self.tok.decode(ids[:-1] if ids and ids[-1] == self.eos_id else ids) for ids in completions]
        return rows, completions, texts

    def prepare(self, model, batch):
        """Sample G completions of each prompt, reward them, and lay out the loss's rows: x, y (B G, L) with y the
        completion tokens (-1 elsewhere), advantages, rewards, zero_std, truncated (B G,)."""
        prompts, lengths, index, draws = batch
        G, device = self.c["grpo_num_generations"], prompts.device
        prompts, lengths = prompts.repeat_interleave(G, dim=0), lengths.repeat_interleave(G)  # prompt i: rows iG..
        generators = [sampling_generator(self.c["seed"], int(d), g, device) for d in draws.tolist() for g in range(G)]
        rows, completions, texts = self.complete(model, prompts, lengths, generators)
        targets = [self.targets[i] for i in index.tolist() for _ in range(G)]
        rewards = torch.tensor([score(self.c["grpo_reward"], text, target) for text, target in zip(texts, targets)],
                               device=device)
        advantages, zero_std = group_advantages(rewards, G, self.c["grpo_scale_rewards"])
        L = max(len(p) + len(o) for p, o in zip(rows, completions)) - 1
        x = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), L), -1, dtype=torch.long)
        for r, (p, o) in enumerate(zip(rows, completions)):  # x = (prompt + completion)[:-1]; y: o where it is next
            ids = torch.tensor(p + o)
            x[r, :len(ids) - 1], y[r, len(p) - 1:len(ids) - 1] = ids[:-1], ids[len(p):]
        truncated = torch.tensor([not o or o[-1] != self.eos_id for o in completions], device=device)
        return x.to(device), y.to(device), advantages, rewards, zero_std, truncated

    # ---- the step ----------------------------------------------------------------------------------------------
    def count(self, batch):
        rows, loss_type = batch[0].size(0), self.c["grpo_loss_type"]
        if loss_type == "dapo":
            return (batch[1] != -1).sum()
        return batch[1].new_tensor(rows * (self.c["grpo_max_new_tokens"] if loss_type == "dr_grpo" else 1))

    @torch.no_grad()
    def reference_logps(self, x, y):
        """(n,) the reference's log-probs of the completion tokens: the adapter switched off, or the frozen copy."""
        if self.ref_model is not None:
            return completion_logps(self.ref_model, x, y, self.c["grpo_temperature"])[0]
        from adapters import method_of
        with method_of(self.model).disabled(self.model):
            return completion_logps(self.model, x, y, self.c["grpo_temperature"])[0]

    def loss(self, model, batch):
        """The summed GRPO loss of the micro-batch's completions and the sums of TRL's metrics."""
        x, y, advantages, rewards, zero_std, truncated = batch
        c = self.c
        # the reference first: its logits are freed before the policy's forward keeps activations for backward
        ref = self.reference_logps(x, y) if c["grpo_beta"] > 0 else None
        logps, entropy, row = completion_logps(model, x, y, c["grpo_temperature"])
        per_token, clipped = clipped_surrogate(logps, logps.detach(), advantages[row], c["grpo_epsilon"])
        kl = torch.zeros_like(logps)  # not logged without a reference (grpo_beta=0)
        if ref is not None:
            kl = k3(logps, ref)
            per_token = per_token + c["grpo_beta"] * kl
        loss_sum = aggregate(per_token, row, x.size(0), c["grpo_loss_type"])
        n, tokens = float(x.size(0)), float(row.numel())
        sums = [rewards.sum(), (rewards ** 2).sum(), zero_std.sum(), kl.detach().sum(), entropy.sum(), clipped.sum(),
                truncated.sum(), n, tokens]
        return loss_sum, torch.stack([torch.as_tensor(s, device=x.device).float() for s in sums])

    def metrics(self, sums, prefix=""):
        """{name: mean} of the step's (or the evaluation's) completions and tokens."""
        s = sums.tolist()
        r_sum, r2_sum, zero, kl, entropy, clipped, truncated, n, tokens = s
        values = {"reward": r_sum / n, "reward_std": max(r2_sum - r_sum ** 2 / n, 0) ** 0.5 / max(n - 1, 1) ** 0.5,
                  "frac_reward_zero_std": zero / n, "kl": kl / tokens, "entropy": entropy / tokens,
                  "clip_ratio": clipped / tokens, "completions/mean_length": tokens / n,
                  "completions/clipped_ratio": truncated / n}
        if self.c["grpo_beta"] == 0:
            del values["kl"]
        return {prefix + k: v for k, v in values.items()}

    # ---- evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, val_loader):
        """{'eval_reward': the mean reward of the greedy completion of every val prompt (up to eval_iters batches
        per rank)}, all ranks: with exact or numeric, the held-out accuracy."""
        totals = torch.zeros(2, device=self.run.device)
        for prompts, lengths, index, _ in self.eval_batches(val_loader):
            _, _, texts = self.complete(self.model, prompts.to(self.run.device), lengths, temperature=0.0)
            rewards = [score(self.c["grpo_reward"], text, val_loader.targets[i]) for text, i in
                       zip(texts, index.tolist())]
            totals += torch.tensor([sum(rewards), len(rewards)], device=self.run.device)
        if self.run.distributed:
            dist.all_reduce(totals)
        return {"eval_reward": (totals[0] / totals[1]).item()}

    def describe(self, record):
        return f"greedy eval reward (held-out accuracy) {record['eval_reward']:.4f}"

