"""parallel.py: FSDP2 shards every parameter across ranks, and its checkpoints are the same files DDP writes.

The FSDP tests start 2 gloo processes on the CPU (torch.multiprocessing) and check, inside them, against a plain
single-process model built from the same seed."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import training.parallel as parallel
from lora import LoRAConfig, apply_lora
from model import GPT, GPTConfig, LLaMA, LLaMAConfig
from training.optim import configure_adamw

WORLD = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny(kind, lora):
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT(GPTConfig(block_size=16, vocab_size=128, n_layer=2, n_head=2, n_embd=32))
    else:
        model = LLaMA(LLaMAConfig(vocab_size=128, n_embd=32, intermediate_size=64, n_layer=2, n_head=4, n_kv_head=2,
                                  max_seq_len=16))
    if lora:
        apply_lora(model, LoRAConfig(r=4, targets=("c_attn",) if kind == "gpt2" else ("q_proj", "v_proj")))
    return model


def run_in_two_processes(fn, *args):
    port = free_port()
    mp.start_processes(_worker, args=(port, fn, args), nprocs=WORLD, join=True, start_method="spawn")


def _worker(rank, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def _each_rank_holds_half(rank):
    for kind in ("gpt2", "llama"):
        _check_half(kind, lora=True)


def _check_half(kind, lora):
    plain = tiny(kind, lora).num_params()
    model = parallel.wrap(tiny(kind, lora), "fsdp", "cpu", 0)
    mine = torch.tensor(parallel.local_numel(model))
    total = mine.clone()
    dist.all_reduce(total)
    assert total.item() == plain  # the shards partition the parameters: nothing lost, nothing repeated
    assert abs(mine.item() - plain / WORLD) <= 0.02 * plain  # each rank ~ 1/world_size (rows split unevenly)


@pytest.mark.slow  # starts 2 processes
def test_fsdp_rank_holds_about_one_over_world_size_of_the_parameters_gpt2_and_llama():
    run_in_two_processes(_each_rank_holds_half)


def word_ids(text):
    """A stand-in tokenizer (no files, the same in every process): one id per word."""
    return [sum(map(ord, word)) % 128 for word in text.split()]


def _forward_only_work_on_every_rank(rank):
    from evals.hellaswag import evaluate
    from test_hellaswag import EXAMPLES
    torch.manual_seed(0)
    plain = GPT(GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=2, n_embd=32))
    torch.manual_seed(0)
    sharded = parallel.wrap(GPT(GPTConfig(block_size=64, vocab_size=128, n_layer=2, n_head=2, n_embd=32)),
                            "fsdp", "cpu", 0)
    prompt = torch.tensor([[1, 2, 3]]).repeat(2, 1)
    expected = plain.generate(prompt, 8, top_k=50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(sharded.generate(prompt, 8, top_k=50, generator=torch.Generator().manual_seed(7)), expected)
    # 7 examples, one per forward: rank 0 scores 4 and rank 1 3, yet both must take part in 4 forwards
    whole = evaluate(plain, EXAMPLES, "cpu", word_ids, batch_examples=1)
    assert evaluate(sharded, EXAMPLES, "cpu", word_ids, batch_examples=1, rank=rank, world_size=WORLD) == whole


@pytest.mark.slow  # starts 2 processes
def test_an_fsdp_model_samples_and_scores_hellaswag_like_the_plain_model_on_every_rank():
    run_in_two_processes(_forward_only_work_on_every_rank)


def test_an_optimizer_state_keyed_by_position_loads_by_parameter_name():
    model = tiny("gpt2", lora=False)
    optimizer = configure_adamw(model, 0.1, 1e-2, (0.9, 0.95), "cpu", verbose=False)
    model(torch.randint(0, 128, (2, 8)), torch.randint(0, 128, (2, 8)))[1].backward()
    optimizer.step()
    by_position = optimizer.state_dict()  # what checkpoints held before they were keyed by name
    fresh = tiny("gpt2", lora=False)
    fresh_optimizer = configure_adamw(fresh, 0.1, 1e-2, (0.9, 0.95), "cpu", verbose=False)
    parallel.load_optimizer_state(fresh, fresh_optimizer, by_position)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(fresh_optimizer.state[q][key], optimizer.state[p][key]), (name, key)
