"""DPOLoader: micro-batches of preference pairs (prepare_sft.py's preference shards) for `objective = 'dpo'`.

A micro-batch is B pairs: x, y (2B, L), the B chosen rows then the B rejected rows, each padded on the right to
the longest of the 2B (plain causal attention keeps the padding out of view; y = -1 off the answer), so the two
examples of a pair are always in the same micro-batch, on the same rank. The third item is the pairs' stored
reference log-probs (2B,) when dpo_reference='precompute', else None.

The order, the split over ranks and state_dict() are SFTLoader's with one pair a row (packing=False): every epoch
visits the pairs in an order shuffled by (seed, epoch); a step reads B * world_size pairs per micro-step, rank r
taking pairs [r*B, (r+1)*B) of them.

Precomputed reference log-probs live next to the data, in reference_logps_<fingerprint>.npz (train and val, each
(n_pairs, 2): chosen, rejected), named by the fingerprint of the model they were computed with: a resume, or
another run from the same starting model, reads them instead of computing them again. The file also records the
data_id of sft.json (a hash of the shards prepare_sft.py wrote): log-probs of other data are refused, even when
the number of pairs is the same.
"""
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tools.atomic import atomic_path
from loaders.sft import SFTLoader, example_xy, read_examples
from tools.errors import UserError


class DPOLoader(SFTLoader):
    def __init__(self, data_dir, B, T, process_rank=0, num_processes=1, split="train", seed=1337, shuffle=None):
        self.header, examples = read_examples(data_dir, split, kind="preference")
        self.data_dir, self.split = data_dir, split
        self.examples = list(zip(examples[0::2], examples[1::2]))  # [((ids, mask) chosen, (ids, mask) rejected)]
        self.B, self.T, self.rank, self.world = B, T, process_rank, num_processes
        self.packing, self.seed = False, seed
        self.shuffle = split == "train" if shuffle is None else shuffle
        longest = max(len(ids) for ids, _ in examples)
        if longest - 1 > T:
            raise UserError(f"{data_dir}: the longest {split} example has {longest} tokens, more than block_size+1 = "
                             f"{T + 1}; use a larger block_size, or prepare_sft.py --block_size={T + 1}")
        self.pad_id = int(self.header.get("pad_id", 0))
        self.epoch, self.row, self._rows_epoch, self._rows = 0, 0, None, None
        self.ref_logps = None  # (n_pairs, 2) float32 once set_reference() has run

    def collate(self, rows):
        """x, y (2B, L) int64, chosen rows then rejected rows, and the stored reference log-probs (2B,) or None."""
        pairs = [self.examples[i] for row in rows for i in row]
        pieces = [example_xy(*chosen) for chosen, _ in pairs] + [example_xy(*rejected) for _, rejected in pairs]
        L = max(len(x) for x, _ in pieces)
        x = torch.full((len(pieces), L), self.pad_id, dtype=torch.long)
        y = torch.full((len(pieces), L), -1, dtype=torch.long)
        for r, (ex_x, ex_y) in enumerate(pieces):
            x[r, :len(ex_x)], y[r, :len(ex_y)] = torch.from_numpy(ex_x), torch.from_numpy(ex_y)
        ref = None
        if self.ref_logps is not None:
            idx = [i for row in rows for i in row]
            ref = torch.cat([self.ref_logps[idx, 0], self.ref_logps[idx, 1]])  # (2B,)
        return x, y, ref

    def all_pairs(self):
        """(pair indices, batch) over this rank's stride of every pair, in file order, B pairs at a time."""
        mine = list(range(len(self.examples)))[self.rank::self.world]
        for i in range(0, len(mine), self.B):
            rows = [[j] for j in mine[i:i + self.B]]
            yield mine[i:i + self.B], self.collate(rows)


def reference_path(data_dir, model_fingerprint):
    return Path(data_dir) / f"reference_logps_{model_fingerprint}.npz"


def precompute_reference(loaders, logps_of, path, device, master=True, ddp=False):
    """Give every loader its reference log-probs, from `path` or, when it is missing, from one pass of logps_of(x, y)
    -> (2B,) over all the pairs (each rank its stride, summed over ranks), written to `path` atomically by rank 0."""
    path = Path(path)
    if not path.exists():
        arrays = {}
        for loader in loaders:
            values = torch.zeros(len(loader.examples), 2, dtype=torch.float32, device=device)
            for idx, (x, y, _) in loader.all_pairs():
                logps = logps_of(x.to(device), y.to(device)).float()  # (2B,)
                values[idx, 0], values[idx, 1] = logps[:len(idx)], logps[len(idx):]
            if ddp:
                dist.all_reduce(values)  # every pair was computed on exactly one rank, zeros elsewhere
            arrays[loader.split] = values.cpu().numpy()
        counts = ', '.join(f'{len(a):,} {s}' for s, a in arrays.items())
        data_id = loaders[0].header.get("data_id") if loaders else None
        if data_id is not None:
            arrays["data_id"] = np.array(data_id)
        if master:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)
            print(f"reference log-probs of {counts} pairs saved to {path}")
        if ddp:
            dist.barrier()  # the file is whole before any rank goes on
    elif master:
        print(f"reference log-probs read from {path}")
    again = f"delete {path} to compute it again"
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path} is not a readable file of reference log-probs ({reason}): {again}") from None
    data_id = loaders[0].header.get("data_id") if loaders else None
    if "data_id" in arrays and data_id is not None and str(arrays["data_id"]) != data_id:
        raise UserError(f"{path} holds the reference log-probs of other data than {loaders[0].data_dir} holds now "
                         f"(prepared again since?): {again}")
    for loader in loaders:
        values = arrays.get(loader.split)
        if values is None or values.shape != (len(loader.examples), 2):
            found = "no" if values is None else values.shape[0]
            raise UserError(f"{path} holds {found} {loader.split} pairs, {loader.data_dir} "
                             f"{len(loader.examples)}: the data changed since; {again}")
        loader.ref_logps = torch.from_numpy(values)
