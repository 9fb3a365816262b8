"""DataLoaderLite: (B, T) batches of next-token prediction from the token shards fineweb.py writes.

The shards of one split, in name order, are one long stream of tokens. Each step reads B*T+1 consecutive
tokens: x = buf[:-1], y = buf[1:] (the target of every position is the token after it), viewed as (B, T).

With DDP, the processes read consecutive slices of one "round" of B*T*num_processes tokens:

    shard:  | rank 0 | rank 1 | ... | rank P-1 | rank 0 | rank 1 | ...
            ^ round start (position)            ^ next round

so together they cover the stream exactly once, with no overlap. When the next round would run past the
end of the shard, every rank moves to the next shard together (the leftover tail of fewer than a round's
tokens is skipped), and after the last shard the stream wraps around to the first: a new epoch.

state_dict() is {"shard", "position"} where position is the start of the next round, the same on every
rank: train.py saves rank 0's state and every rank loads it, and each adds its own offset B*T*rank.

fineweb.py records the tokenizer of the shards it writes in shards.json (its name, tokenizer_fingerprint and vocab
size): check_tokenizer refuses a model whose tokenizer is another, whose ids would mean other words even where they
fit its vocabulary. A folder without shards.json (shards of an older fineweb.py) has only the vocabulary check.
"""
import glob
import json
import os

import numpy as np
import torch
from tools.errors import UserError

HEADER = "shards.json"  # fineweb.py's record of the tokenizer; not a shard (only *_{split}_*.npy files are)


def read_header(data_dir):
    """shards.json of a fineweb.py folder, or None when the folder has none (shards of an older fineweb.py)."""
    path = os.path.join(data_dir, HEADER)
    if not os.path.isfile(path):
        return None
    remake = "remake the shards with fineweb.py, or delete the file to train on them with the vocabulary check only"
    try:
        with open(path, encoding="utf-8") as f:
            header = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}): the file is damaged; {remake}") from None
    if not isinstance(header, dict) or not {"tokenizer", "tokenizer_fingerprint"} <= set(header):
        raise UserError(f"{path} names no tokenizer and tokenizer_fingerprint: not the file fineweb.py writes; "
                         f"{remake}")
    return header


def load_tokens(path, mmap_mode=None):
    """A shard's token array; a truncated or foreign .npy file is refused by name (numpy's own message may advise
    unpickling, which a data file never needs)."""
    try:
        tokens = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # a file the system cannot read (permission, I/O): its own message names it
        reason = "it holds Python objects" if "pickle" in str(e) or "objects" in str(e) else str(e).split(".")[0]
        raise UserError(f"shard {path} is not a readable .npy array of token ids ({reason}): the file is truncated "
                         f"or not fineweb.py's; remake the shards with fineweb.py") from None
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise UserError(f"shard {path} is not a 1-D array of token ids (shape {tokens.shape}, dtype {tokens.dtype}); "
                         f"remake it with fineweb.py")
    return tokens


class DataLoaderLite:
    def __init__(self, data_dir, B, T, process_rank=0, num_processes=1, split="train"):
        if split not in ("train", "val"):
            raise UserError(f"split={split!r}: use 'train' or 'val'")
        if not 0 <= process_rank < num_processes:
            raise UserError(f"process_rank={process_rank} must be in [0, num_processes={num_processes})")
        self.data_dir, self.B, self.T = data_dir, B, T
        self.process_rank, self.num_processes, self.split = process_rank, num_processes, split
        self.round_tokens = B * T * num_processes  # tokens all ranks consume per step
        self.vocab_size = None  # set by check_vocab: then every shard loaded is checked against it
        self.header = read_header(data_dir)  # the tokenizer the shards were made with, or None
        self.shards = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.npy")))
        if not self.shards:
            where = "does not exist" if not os.path.isdir(data_dir) else f"holds no {split} shards (*_{split}_*.npy)"
            raise FileNotFoundError(
                f"data_dir {data_dir!r} {where}. Make the shards first, e.g. "
                f"python fineweb.py --source shakespeare --out_dir {data_dir} "
                f"(or --source fineweb-edu, or --source files PATH...)"
            )
        # check every shard now (mmap reads only the header) rather than crash hours in at a short last shard
        for path in self.shards:
            n_tokens = len(load_tokens(path, mmap_mode="r"))
            self._check_fits(path, n_tokens)
        self.reset()

    def _check_fits(self, path, n_tokens):
        # one round plus the extra token that is the target of the round's last position
        if n_tokens < self.round_tokens + 1:
            raise UserError(
                f"shard {path} has {n_tokens:,} tokens, fewer than one step needs: B*T*num_processes+1 = "
                f"{self.B}*{self.T}*{self.num_processes}+1 = {self.round_tokens + 1:,}. "
                f"Use a smaller batch_size/block_size, or remake the shards with a larger --shard_size"
            )

    def _load_shard(self, index):
        tokens = load_tokens(self.shards[index])
        if self.vocab_size is not None:
            self._check_ids(self.shards[index], tokens)
        return tokens

    def check_vocab(self, vocab_size):
        """Refuse token ids the model has no embedding for: in the shard in memory now, and in every one loaded
        later (each is checked once, when it is read in; one pass over memory that is read anyway)."""
        self.vocab_size = vocab_size
        self._check_ids(self.shards[self.shard], self.tokens)

    def check_tokenizer(self, model_spec):
        """Refuse shards made with another tokenizer than the model's: model_spec is what load_tokenizer takes for
        the model (None: a model from scratch, which takes any data). Compared by tokenizer_fingerprint, as
        loaders/sft.py compares prepare_sft.py's folders; a folder without shards.json is not checked."""
        if self.header is None or model_spec is None:
            return
        from loaders.sft import check_tokenizer
        source = self.header.get("source") or "SOURCE"
        remake = (f"remake the shards with the model's tokenizer: python fineweb.py --source {source}"
                  f"{' FILES...' if source == 'files' else ''} --tokenizer {model_spec} --out_dir "
                  f"{os.path.normpath(self.data_dir)}_{os.path.basename(os.path.normpath(str(model_spec)))}")
        check_tokenizer(self.data_dir, self.header, model_spec, remake=remake)

    def _check_ids(self, path, tokens):
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise UserError(f"shard {path} holds token id {bad}, outside the model's vocabulary "
                             f"[0, {self.vocab_size}): the shards were made with another tokenizer. Remake them "
                             f"with the model's (fineweb.py --tokenizer MODEL_FOLDER), or train a model with "
                             f"vocab_size > {high}")

    def reset(self):
        """Back to the first round of the first shard (the val loader does this before every evaluation)."""
        self.shard = 0
        self.tokens = self._load_shard(0)
        self.position = 0

    def next_batch(self):
        B, T = self.B, self.T
        start = self.position + B * T * self.process_rank  # this rank's slice of the round
        buf = torch.from_numpy(self.tokens[start:start + B * T + 1].astype(np.int64))  # (B*T+1,)
        x = buf[:-1].view(B, T)  # inputs
        y = buf[1:].view(B, T)  # targets: each input's next token
        self.position += self.round_tokens
        if self.position + self.round_tokens + 1 > len(self.tokens):  # the next round does not fit: next shard
            self.shard = (self.shard + 1) % len(self.shards)
            self.tokens = self._load_shard(self.shard)
            self.position = 0
        return x, y

    def eval_batches(self, max_batches):
        """The first max_batches batches of the split, from its start: every evaluation reads the same ones."""
        self.reset()
        for _ in range(max_batches):
            yield self.next_batch()

    def state_dict(self):
        """Where the next batch comes from, as plain ints (a checkpoint loaded with weights_only=True)."""
        return {"shard": int(self.shard), "position": int(self.position)}

    def load_state_dict(self, state):
        """Continue exactly where the loader that made `state` would have: its next batch is ours."""
        shard, position = int(state["shard"]), int(state["position"])
        if not 0 <= shard < len(self.shards):
            raise UserError(f"loader state shard={shard}, but {self.data_dir} has {len(self.shards)} "
                             f"{self.split} shards: was the checkpoint made with other data?")
        tokens = self._load_shard(shard)
        if position < 0 or position + self.round_tokens + 1 > len(tokens):
            raise UserError(f"loader state position={position} does not leave a whole step "
                             f"({self.round_tokens + 1:,} tokens) in {self.shards[shard]} ({len(tokens):,} tokens): "
                             f"was the checkpoint made with other data?")
        self.shard, self.tokens, self.position = shard, tokens, position
