"""parallel.py: FSDP2 shards every parameter across ranks, and its checkpoints are the same files DDP writes.

Each test starts 2 gloo processes on the CPU (torch.multiprocessing) and checks, inside them, against a plain
single-process model built from the same seed."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import parallel
from lora import LoRAConfig, apply_lora
from model import GPT, GPTConfig, LLaMA, LLaMAConfig

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


def test_fsdp_rank_holds_about_one_over_world_size_of_the_parameters_gpt2_and_llama():
    run_in_two_processes(_each_rank_holds_half)
