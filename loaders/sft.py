"""SFTLoader: micro-batches of task examples (prepare_sft.py's shards) for `objective = 'sft'`.

An example of n tokens gives n - 1 positions: x = ids[:-1], y = ids[1:] where the mask of ids[1:] is 1, else -1
(the loss's ignore_index: prompt, template and padding are never targets; the memory-saving loss keeps -1 too).

    packing=True   examples follow one another in rows of block_size positions (a new row when the next does not
                   fit); position_ids restart at 0 for every example, which the models turn into positions and
                   a block-diagonal causal mask (model/attention.py), so no example sees another. The row's
                   unused tail is padding (y = -1).
    packing=False  one example a row, padded on the right to the longest row of the micro-batch; position_ids is
                   None: plain causal attention, which keeps padding after the tokens out of their view.

Every epoch visits the training examples in an order shuffled by (seed, epoch) and cuts that order into rows.
The rows form one stream; a step of `grad_accum_steps` micro-batches on `world_size` ranks reads the next
B * world_size rows per micro-step, rank r taking rows [r*B, (r+1)*B) of them, so one process with twice the
accumulation reads the same rows per optimizer step. state_dict() = {"epoch", "row"}: where the stream stands,
the same on every rank.
"""
import glob
import json
import os
import re
import zipfile

import numpy as np
import torch
from tools.errors import UserError

HEADER = "sft.json"
SHARD_NAME = re.compile(r"(train|val)_\d{6}\.npz")  # prepare_sft.py's shard names
REMAKE = "remake the folder with prepare_sft.py --overwrite"


def read_header(data_dir):
    """sft.json of a prepare_sft.py folder, checked for what the loaders read."""
    header_path = os.path.join(data_dir, HEADER)
    if not os.path.isfile(header_path):
        raise FileNotFoundError(f"data_dir {data_dir!r} has no {HEADER}: objective='sft' reads the folder "
                                f"prepare_sft.py writes (python prepare_sft.py --input ... --val ... --out {data_dir})")
    try:
        with open(header_path, encoding="utf-8") as f:
            header = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{header_path} is not valid JSON ({e}): the file is damaged; {REMAKE}") from None
    missing = [k for k in ("tokenizer", "vocab_size") if not isinstance(header, dict) or k not in header]
    if missing:
        raise UserError(f"{header_path} lacks {', '.join(missing)}: not the header prepare_sft.py writes; {REMAKE}")
    if not isinstance(header.get("splits", {}), dict):
        raise UserError(f"{header_path}: \"splits\" is not an object: not the header prepare_sft.py writes; {REMAKE}")
    return header


def split_info(header, split):
    """What sft.json records of one split ({} when nothing)."""
    info = header.get("splits", {}).get(split)
    return info if isinstance(info, dict) else {}


def shard_paths(data_dir, header, split):
    """The split's shard files: those sft.json lists (a file the header does not name is not read), else every
    {split}_*.npz of the folder (headers of older versions list none)."""
    listed = split_info(header, split).get("shards")
    if isinstance(listed, list):
        return [os.path.join(data_dir, name) for name in listed]
    return sorted(glob.glob(os.path.join(data_dir, f"{split}_*.npz")))


def read_shard(path):
    """(tokens, mask, offsets) of one shard, checked: a truncated or foreign file is refused by name."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing, though {HEADER} lists it; {REMAKE}")
    try:
        with np.load(path, allow_pickle=False) as shard:
            tokens, mask, offsets = shard["tokens"], shard["mask"], shard["offsets"]
    except (zipfile.BadZipFile, EOFError, KeyError, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable shard ({reason}): the file is truncated or not prepare_sft.py's; "
                         f"{REMAKE}") from None
    if (tokens.ndim != 1 or mask.shape != tokens.shape or offsets.ndim != 1 or len(offsets) < 2 or offsets[0] != 0
            or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 1)):
        raise UserError(f"{path}: tokens, mask and offsets do not fit together; {REMAKE}")
    return tokens, mask, offsets


OBJECTIVE_OF = {"sft": "sft", "preference": "dpo", "prompt": "grpo"}  # a folder's kind -> the objective that reads it


def read_answers(path, n):
    """The targets of a prompt shard: one dict per prompt (prepare_sft.py's JSON strings)."""
    try:
        with np.load(path, allow_pickle=False) as shard:
            answers = [json.loads(a) for a in shard["answers"].tolist()]
    except (KeyError, ValueError, OSError) as e:
        raise UserError(f"{path} holds no readable answers ({type(e).__name__}): not a prompt shard of "
                         f"prepare_sft.py; {REMAKE}") from None
    if len(answers) != n or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
        raise UserError(f"{path}: its answers do not fit its prompts; {REMAKE}")
    return answers


def read_examples(data_dir, split, kind="sft"):
    """(header, [(ids, mask)]) of one split: numpy arrays per example, in file order. kind: what the objective
    needs, 'sft' (examples), 'preference' (pairs, as consecutive examples) or 'prompt' ((ids, mask, target) per
    prompt, target the dict a reward reads)."""
    header = read_header(data_dir)
    if header.get("kind", "sft") != kind:
        has = header.get("kind", "sft")
        raise UserError(f"data_dir {data_dir!r} holds {has} data, but objective={OBJECTIVE_OF[kind]!r} needs {kind} "
                         f"data: prepare another folder, or use objective={OBJECTIVE_OF.get(has, 'sft')!r}")
    examples = []
    for path in shard_paths(data_dir, header, split):
        tokens, mask, offsets = read_shard(path)
        examples += [(tokens[a:b].astype(np.int64), mask[a:b].astype(bool)) for a, b in zip(offsets[:-1], offsets[1:])]
        if kind == "prompt":
            shard = examples[len(examples) - len(offsets) + 1:]
            examples[len(examples) - len(shard):] = [(*ex, target) for ex, target in
                                                     zip(shard, read_answers(path, len(shard)))]
    if not examples:
        raise FileNotFoundError(f"{data_dir} holds no {split} shards ({split}_*.npz); remake it with prepare_sft.py")
    if kind == "preference" and len(examples) % 2:
        raise UserError(f"{data_dir}: its {split} shards hold {len(examples)} examples, not whole pairs; {REMAKE}")
    expected = split_info(header, split).get("examples")
    per_item, items = (2, "pairs") if kind == "preference" else (1, "examples")
    if isinstance(expected, int) and expected * per_item != len(examples):
        raise UserError(f"{data_dir}: {HEADER} counts {expected} {split} {items}, its shards hold "
                         f"{len(examples) // per_item}; {REMAKE}")
    return header, examples


def check_tokenizer(data_dir, header, model_spec, remake=None):
    """Refuse data tokenized with another tokenizer than the model's: model_spec is what load_tokenizer takes for
    the model (its folder, out_dir, adapter or .gguf file; None: a model from scratch, which takes any data). The
    tokenizers are compared by what they do (tokenizer_fingerprint), not by the names they were given. remake: what
    the message tells the user to do (default: prepare_sft.py's command; loaders/tokens.py gives fineweb.py's)."""
    if model_spec is None:
        return
    from tokenization import load_tokenizer
    from tokenization.tokenizer import tokenizer_fingerprint
    try:
        model_tok = load_tokenizer(model_spec)
    except (ValueError, OSError, ImportError):
        return  # a model without a tokenizer of its own: the vocabulary check is all there is
    data = header.get("tokenizer_fingerprint")
    if data is None:  # a folder from an older prepare_sft.py: load the tokenizer it names
        try:
            data = tokenizer_fingerprint(load_tokenizer(header["tokenizer"]))
        except (ValueError, OSError, ImportError):
            return
    if data != tokenizer_fingerprint(model_tok):
        raise UserError(f"{data_dir} was tokenized with {header['tokenizer']}, another tokenizer than the model's "
                         f"({model_tok.name}): its token ids would mean other words to the model; "
                         + (remake or f"prepare it with prepare_sft.py --tokenizer {model_spec}"))


def example_xy(ids, mask):
    """x (n-1,) inputs and y (n-1,) targets: the next token where it is trained on, else -1."""
    return ids[:-1], np.where(mask[1:], ids[1:], -1)


def pack_rows(lengths, order, block_size):
    """Rows of example indices, in `order`, each row's n - 1 positions summing to at most block_size."""
    rows, row, used = [], [], 0
    for i in order:
        n = lengths[i] - 1
        if row and used + n > block_size:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += n
    if row:
        rows.append(row)
    return rows


class SFTLoader:
    def __init__(self, data_dir, B, T, process_rank=0, num_processes=1, split="train", packing=True, seed=1337,
                 shuffle=None):
        self.header, self.examples = read_examples(data_dir, split)
        self.data_dir = data_dir
        self.B, self.T, self.rank, self.world = B, T, process_rank, num_processes
        self.packing, self.seed = packing, seed
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.lengths = [len(ids) for ids, _ in self.examples]
        longest = max(self.lengths)
        if longest - 1 > T:
            raise UserError(f"{data_dir}: the longest {split} example has {longest} tokens, more than block_size+1 = "
                             f"{T + 1}; use a larger block_size, or prepare_sft.py --block_size={T + 1}")
        self.pad_id = int(self.header.get("pad_id", 0))
        self.epoch, self.row, self._rows_epoch, self._rows = 0, 0, None, None

    def check_tokenizer(self, model_spec):
        """Refuse data made with another tokenizer than the model's (check_tokenizer above)."""
        check_tokenizer(self.data_dir, self.header, model_spec)

    def check_vocab(self, vocab_size):
        """Refuse a folder tokenized with more ids than the model has embeddings for."""
        if self.header["vocab_size"] > vocab_size:
            raise UserError(f"{self.data_dir} was tokenized with {self.header['tokenizer']} "
                             f"({self.header['vocab_size']} tokens), more than the model's vocab_size {vocab_size}: "
                             f"prepare it with prepare_sft.py --tokenizer <the model's folder>")

    def rows_of_epoch(self, epoch):
        """The example indices of every row of this epoch (cached for the current one)."""
        if self._rows_epoch != epoch:
            order = np.arange(len(self.examples))
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._rows = pack_rows(self.lengths, order, self.T) if self.packing else [[int(i)] for i in order]
            self._rows_epoch = epoch
        return self._rows

    def _next_rows(self, n):
        rows = []
        while len(rows) < n:
            epoch_rows = self.rows_of_epoch(self.epoch)
            take = epoch_rows[self.row:self.row + n - len(rows)]
            rows += take
            self.row += len(take)
            if self.row == len(epoch_rows):
                self.epoch, self.row = self.epoch + 1, 0
        return rows

    def collate(self, rows):
        """x, y (B, L) int64 and position_ids (B, L) or None; L = block_size when packing, else the longest row."""
        pieces = [[example_xy(*self.examples[i]) for i in row] for row in rows]
        L = self.T if self.packing else max(sum(len(x) for x, _ in row) for row in pieces)
        x = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), L), -1, dtype=torch.long)
        pos = torch.zeros((len(rows), L), dtype=torch.long)  # the padded tail counts as one more "example"
        for r, row in enumerate(pieces):
            t = 0
            for ex_x, ex_y in row:
                n = len(ex_x)
                x[r, t:t + n], y[r, t:t + n] = torch.from_numpy(ex_x), torch.from_numpy(ex_y)
                pos[r, t:t + n] = torch.arange(n)
                t += n
            pos[r, t:] = torch.arange(L - t)
        return x, y, (pos if self.packing else None)

    def next_batch(self):
        """This rank's B rows of the next round of B * world_size rows."""
        rows = self._next_rows(self.B * self.world)
        return self.collate(rows[self.rank * self.B:(self.rank + 1) * self.B])

    def eval_batches(self, max_batches=0):
        """This rank's share of the split in file order, B rows at a time (all of it when max_batches is 0)."""
        rows = self.rows_of_epoch(0)[self.rank::self.world]
        batches = [rows[i:i + self.B] for i in range(0, len(rows), self.B)]
        for rows in batches[:max_batches or None]:
            yield self.collate(rows)

    def state_dict(self):
        return {"epoch": int(self.epoch), "row": int(self.row)}

    def load_state_dict(self, state):
        epoch, row = int(state["epoch"]), int(state["row"])
        if epoch < 0 or not 0 <= row < len(self.rows_of_epoch(epoch)):
            raise UserError(f"loader state {state} does not fit this data (other data, block_size or packing?)")
        self.epoch, self.row = epoch, row
