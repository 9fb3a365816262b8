"""DataLoaderLite: contiguous (B, T) batches over the shards, DDP slices, exact resume, clear errors."""
import io
import re

import numpy as np
import pytest
import torch

import fineweb
from loaders.tokens import DataLoaderLite

# every token is unique, so a batch's first token says where in the stream it was read
SHARDS = {
    "toy_val_000000.npy": np.arange(5000, 5040),
    "toy_train_000001.npy": np.arange(0, 45),  # 45 tokens: the tail after the last whole step is skipped
    "toy_train_000002.npy": np.arange(1000, 1032),  # 32 = 4 x 8 tokens, but a step reads 9: only 3 steps fit
}


@pytest.fixture
def data_dir(tmp_path):
    for name, tokens in SHARDS.items():
        np.save(tmp_path / name, tokens.astype(np.uint16))
    return str(tmp_path)


def batch_starts(loader, steps):
    return [int(loader.next_batch()[0][0, 0]) for _ in range(steps)]


def test_batches_are_consecutive_slices_of_the_concatenated_shards(data_dir):
    loader = DataLoaderLite(data_dir, B=2, T=4)
    shard1, shard2 = SHARDS["toy_train_000001.npy"], SHARDS["toy_train_000002.npy"]
    # a step reads 2*4+1 = 9 tokens; shard 1 has room for steps at 0, 8, ..., 32 (32+9 <= 45 < 40+9),
    # shard 2 (32 tokens) for 0, 8, 16; then the stream wraps around to shard 1
    expected = [(shard1, p) for p in (0, 8, 16, 24, 32)] + [(shard2, p) for p in (0, 8, 16)] + [(shard1, 0)]
    for tokens, p in expected:
        x, y = loader.next_batch()
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (2, 4)
        assert torch.equal(x, torch.tensor(tokens[p:p + 8].reshape(2, 4)))
        assert torch.equal(y, torch.tensor(tokens[p + 1:p + 9].reshape(2, 4)))  # the next token of each input


def test_val_split_reads_only_val_shards(data_dir):
    loader = DataLoaderLite(data_dir, B=2, T=4, split="val")
    assert batch_starts(loader, 6) == [5000, 5008, 5016, 5024, 5000, 5008]  # one 40-token shard, wrapping


def test_ranks_read_interleaved_slices_of_each_round(data_dir):
    # 2 ranks x 2*4 tokens = 16 tokens per round; shard 1 holds rounds at 0 and 16, shard 2 one round at 0
    rank0 = DataLoaderLite(data_dir, B=2, T=4, process_rank=0, num_processes=2)
    rank1 = DataLoaderLite(data_dir, B=2, T=4, process_rank=1, num_processes=2)
    assert batch_starts(rank0, 4) == [0, 16, 1000, 0]
    assert batch_starts(rank1, 4) == [8, 24, 1008, 8]


def test_two_ranks_together_read_what_one_process_with_twice_the_batch_reads(data_dir):
    ranks = [DataLoaderLite(data_dir, B=2, T=4, process_rank=r, num_processes=2) for r in range(2)]
    single = DataLoaderLite(data_dir, B=4, T=4)
    for _ in range(7):  # across both shard switches and the wrap-around
        (x0, y0), (x1, y1) = ranks[0].next_batch(), ranks[1].next_batch()
        x, y = single.next_batch()
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


@pytest.mark.parametrize("steps_before_save", [2, 5, 7])  # mid-shard, right at a shard switch, after it
def test_restored_state_gives_the_batches_an_uninterrupted_loader_gives(data_dir, steps_before_save):
    uninterrupted = DataLoaderLite(data_dir, B=2, T=4)
    for _ in range(steps_before_save):
        uninterrupted.next_batch()
    buffer = io.BytesIO()
    torch.save({"loader": uninterrupted.state_dict()}, buffer)  # as in a checkpoint
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["loader"]

    resumed = DataLoaderLite(data_dir, B=2, T=4)
    resumed.load_state_dict(state)
    for _ in range(10):
        (x, y), (x_ref, y_ref) = resumed.next_batch(), uninterrupted.next_batch()
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_rank0_state_restores_every_rank(data_dir):
    # train.py saves rank 0's state and every rank loads it: the state must not depend on the rank
    uninterrupted = [DataLoaderLite(data_dir, B=2, T=4, process_rank=r, num_processes=2) for r in range(2)]
    for loader in uninterrupted:
        loader.next_batch()
    resumed = DataLoaderLite(data_dir, B=2, T=4, process_rank=1, num_processes=2)
    resumed.load_state_dict(uninterrupted[0].state_dict())
    assert batch_starts(resumed, 3) == batch_starts(uninterrupted[1], 3) == [24, 1008, 8]


def test_reset_starts_over_from_the_first_shard(data_dir):
    loader = DataLoaderLite(data_dir, B=2, T=4)
    batch_starts(loader, 6)
    loader.reset()
    assert batch_starts(loader, 2) == [0, 8]


def test_state_that_does_not_fit_the_shards_is_an_error(data_dir):
    loader = DataLoaderLite(data_dir, B=2, T=4)
    with pytest.raises(ValueError, match="shard=7"):
        loader.load_state_dict({"shard": 7, "position": 0})
    with pytest.raises(ValueError, match="position=40"):
        loader.load_state_dict({"shard": 0, "position": 40})


def test_shard_smaller_than_one_step_is_an_error_naming_the_shard_and_sizes(data_dir):
    # 4 ranks x 2*4 tokens + 1 = 33 tokens per step, but shard 2 holds 32
    with pytest.raises(ValueError, match=r"toy_train_000002\.npy has 32 tokens.*2\*4\*4\+1 = 33"):
        DataLoaderLite(data_dir, B=2, T=4, process_rank=0, num_processes=4)


def test_missing_folder_error_names_the_folder_and_the_command(tmp_path):
    missing = str(tmp_path / "nowhere")
    expected = rf"{re.escape(missing)}.*does not exist.*python fineweb\.py --source shakespeare"
    with pytest.raises(FileNotFoundError, match=expected):
        DataLoaderLite(missing, B=2, T=4)


def test_folder_without_shards_of_the_split_is_an_error(tmp_path):
    np.save(tmp_path / "toy_val_000000.npy", np.arange(100, dtype=np.uint16))
    with pytest.raises(FileNotFoundError, match=r"no train shards.*python fineweb\.py"):
        DataLoaderLite(str(tmp_path), B=2, T=4)


def test_reads_the_shards_fineweb_writes(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(f'{{"text": "document number {i} says hello"}}\n' for i in range(40)))
    fineweb.prepare("files", [str(docs)], out_dir=tmp_path / "data", shard_size=64)
    first_train = np.load(tmp_path / "data" / "files_train_000001.npy").astype(np.int64)
    x, y = DataLoaderLite(str(tmp_path / "data"), B=2, T=8).next_batch()
    assert torch.equal(x.flatten(), torch.from_numpy(first_train[:16]))
    assert torch.equal(y.flatten(), torch.from_numpy(first_train[1:17]))
