"""PromptLoader: micro-batches of prompts with their answers (prepare_sft.py's prompt folders) for objective='grpo'.

A micro-batch is B prompts: their ids (B, P) padded on the right to the longest, their lengths (B,), their indices
in the split (B,), for the objective to find each one's target (loader.targets), and their draws (B,): the
position of each in the stream of prompts, epoch * n_prompts + its place in that epoch's order. A draw names one
visit of one prompt for the whole run, whatever the number of processes: the objective seeds that prompt's
sampling from it, so two processes sample what one does, and a resumed run what the uninterrupted one did.

The order, the split over ranks and state_dict() are SFTLoader's with one prompt a row (packing=False): every
epoch visits the prompts in an order shuffled by (seed, epoch); a micro-step reads B * world_size prompts, rank r
taking prompts [r*B, (r+1)*B) of them.
"""
import torch

from loaders.sft import SFTLoader, read_examples
from tools.errors import UserError


class PromptLoader(SFTLoader):
    def __init__(self, data_dir, B, T, process_rank=0, num_processes=1, split="train", seed=1337, shuffle=None,
                 max_new_tokens=1):
        self.header, examples = read_examples(data_dir, split, kind="prompt")
        self.data_dir, self.split = data_dir, split
        self.examples = [(ids, mask) for ids, mask, _ in examples]
        self.targets = [target for _, _, target in examples]
        self.B, self.T, self.rank, self.world = B, T, process_rank, num_processes
        self.packing, self.seed = False, seed
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.lengths = [len(ids) for ids, _ in self.examples]
        longest = max(self.lengths)
        if longest + max_new_tokens - 1 > T:  # the loss reads prompt + completion, less the last token
            raise UserError(f"{data_dir}: the longest {split} prompt has {longest} tokens, and with "
                             f"grpo_max_new_tokens={max_new_tokens} its rows need block_size >= "
                             f"{longest + max_new_tokens - 1} (block_size={T}): raise block_size or lower "
                             f"grpo_max_new_tokens")
        self.pad_id = int(self.header.get("pad_id", 0))
        self.epoch, self.row, self._rows_epoch, self._rows = 0, 0, None, None

    def collate(self, rows, draws=None):
        """prompts (B, P) right-padded, lengths (B,), indices (B,), draws (B,); all int64."""
        index = [i for row in rows for i in row]
        lengths = [self.lengths[i] for i in index]
        prompts = torch.full((len(index), max(lengths)), self.pad_id, dtype=torch.long)
        for r, i in enumerate(index):
            prompts[r, :lengths[r]] = torch.from_numpy(self.examples[i][0])
        draws = torch.full((len(index),), -1, dtype=torch.long) if draws is None else torch.tensor(draws)
        return prompts, torch.tensor(lengths), torch.tensor(index), draws

    def next_batch(self):
        """This rank's B prompts of the next round of B * world_size, with their draws."""
        first = self.epoch * len(self.examples) + self.row  # one prompt a row: every epoch has len(examples) rows
        rows = self._next_rows(self.B * self.world)
        mine = slice(self.rank * self.B, (self.rank + 1) * self.B)
        return self.collate(rows[mine], list(range(first, first + len(rows)))[mine])
