"""bench/: the FLOP arithmetic against hand counts, and each script end to end in a tiny configuration.

No test asserts a time: only that the tables have their rows and columns and the counts are right.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from training.flops import peak_for_name

from bench import common, timing
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--vocab_size", "64", "--B", "1", "--T", "16",
        "--iters", "1", "--warmup", "0", "--threads", "1"]

# A 1-layer GPT with C = 32, vocab 64, biases, counted by hand (wpe is a lookup and is not counted):
#   wte 64*32 = 2048 | ln_1, ln_2, ln_f 3 * 2*32 = 192 | c_attn 32*96 + 96 = 3168 | attn.c_proj 32*32 + 32 = 1056
#   c_fc 32*128 + 128 = 4224 | mlp.c_proj 128*32 + 32 = 4128                             total N = 14816
N_TINY = 2048 + 192 + 3168 + 1056 + 4224 + 4128
# LoRA r=2 on all four block linears: r * (in + out) each
LORA_R2 = 2 * (32 + 96) + 2 * (32 + 32) + 2 * (32 + 128) + 2 * (128 + 32)  # = 1024
ATTN_TRAIN = 12 * 1 * 32 * 16  # 12 * n_layer * C * T at T = 16


@pytest.fixture(autouse=True)
def short_chunks(monkeypatch):
    """Judge CPU noise per iteration, not per 0.3 s chunk: the tiny configurations take milliseconds."""
    monkeypatch.setattr(timing, "CHUNK_S", 0.0)


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32))


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_full_training_flops_are_six_per_parameter_plus_attention():
    assert timing.train_flops_per_token(tiny_gpt(), 16) == 6 * N_TINY + ATTN_TRAIN


def test_lora_flops_are_four_per_frozen_and_six_per_adapter_parameter():
    from lora import LoRAConfig, apply_lora
    model = apply_lora(tiny_gpt(), LoRAConfig(r=2, alpha=4, targets=("c_attn", "c_proj", "c_fc")))
    assert timing.num_trainable(model) == LORA_R2
    assert timing.train_flops_per_token(model, 16) == 4 * N_TINY + 6 * LORA_R2 + ATTN_TRAIN


def test_inference_flops_are_two_per_parameter_plus_attention_forward():
    assert timing.forward_flops_per_token(tiny_gpt(), 16) == 2 * N_TINY + 4 * 1 * 32 * 16


def test_summary_gives_median_quartiles_and_extremes():
    s = timing.summarize([4.0, 1.0, 100.0, 3.0, 2.0])
    assert (s["median"], s["p25"], s["p75"], s["min"], s["max"], s["n"]) == (3.0, 2.0, 4.0, 1.0, 100.0, 5)


def test_gpu_peak_table_prefers_the_specific_name():
    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_for_name("NVIDIA H100 PCIe") == 756e12
    assert peak_for_name("NVIDIA L40S") == 362e12  # not L4's 121
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_for_name("Tesla V100-SXM2-16GB") is None  # no bf16: no MFU
    assert timing.peak_flops("cpu", torch.bfloat16) is None


def test_bf16_on_cpu_is_refused_with_a_clear_message():
    with pytest.raises(SystemExit, match="fp32"):
        common.parse_dtype("bf16", "cpu")


def test_fused_crossover_model_matches_hand_values():
    fvs = load_script("fused_vs_split")
    assert fvs.n_flop(768, 2304) == 576  # 768 * 2304 / 3072
    assert fvs.n_byte(768, 2304) == pytest.approx(1316.57, abs=0.01)  # 4 * 768 * 2304 / (768 + 2 * 2304)
    # points are (tokens, fused/split ratio): fused must stay faster from that token count on; a loss at the
    # largest N means "never"
    assert fvs.first_win([(16, 2.0), (256, 0.9), (4096, 0.5)]) == 256
    assert fvs.first_win([(16, 0.5), (256, 2.0), (4096, 0.5)]) == 4096
    assert fvs.first_win([(16, 0.5), (4096, 2.0)]) is None


def test_rank_sweep_table_has_every_row_and_column(tmp_path):
    sweep = load_script("lora_rank_sweep")
    rows = sweep.main(TINY + ["--ranks", "1,2", "--inprocess", "--out_dir", str(tmp_path)])
    assert [r["name"] for r in rows] == ["full", "split-r1", "split-r2", "fused-r1", "fused-r2", "merged"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["full"]["trainable"] == N_TINY + 1024 * 32  # + wpe (block_size 1024): trains, not a matmul
    assert by_name["split-r2"]["trainable"] == by_name["fused-r2"]["trainable"] == LORA_R2
    assert by_name["split-r2"]["flops_per_token"] == 4 * N_TINY + 6 * LORA_R2 + ATTN_TRAIN
    assert by_name["merged"]["flops_per_token"] == 2 * (N_TINY + LORA_R2 // 2) + 4 * 32 * 16  # r=1 adapter kept
    md = (tmp_path / "cpu_lora_rank_sweep.md").read_text()
    for column in ("fwd ms", "bwd ms", "opt ms", "step ms", "step / full", "fwd+bwd / full", "peak RSS",
                   "trainable", "tok/s", "FLOP/s"):
        assert column in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)  # header + one line per row
    saved = json.loads((tmp_path / "cpu_lora_rank_sweep.json").read_text())
    assert [r["name"] for r in saved["rows"]] == [r["name"] for r in rows]


@pytest.mark.slow  # starts processes
def test_rank_sweep_runs_from_the_repo_root_with_one_process_per_row(tmp_path):
    cmd = [sys.executable, "bench/lora_rank_sweep.py", *TINY, "--modes", "full,split", "--ranks", "1",
           "--out_dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    saved = json.loads((tmp_path / "cpu_lora_rank_sweep.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["full", "split-r1"]
    assert saved["idle_rss"] > 0 and all(r["peak_mem"] >= saved["idle_rss"] for r in saved["rows"])


def test_rank_sweep_rejects_an_unknown_mode(tmp_path):
    sweep = load_script("lora_rank_sweep")
    with pytest.raises(SystemExit, match="modes"):
        sweep.main(TINY + ["--modes", "full,lora", "--out_dir", str(tmp_path)])


def test_fused_vs_split_times_every_shape_token_and_rank(tmp_path):
    fvs = load_script("fused_vs_split")
    rows, summary = fvs.main(["--shapes", "32x48,48x32", "--tokens", "4,16", "--ranks", "1,2", "--iters", "1",
                              "--warmup", "0", "--threads", "1", "--out_dir", str(tmp_path)])
    assert [(r["shape"], r["tokens"], r["r"]) for r in rows] == [
        (s, n, r) for s in ("32x48", "48x32") for n in (4, 16) for r in (1, 2)]
    assert [(s["shape"], s["r"]) for s in summary] == [(s, r) for s in ("32x48", "48x32") for r in (1, 2)]
    md = (tmp_path / "cpu_fused_vs_split.md").read_text()
    for column in ("plain fwd", "split fwd", "fused fwd", "merged fwd", "split bwd", "fused bwd", "model N_flop"):
        assert column in md


def test_vs_peft_trains_the_same_parameters_as_peft_and_transformers(tmp_path):
    pytest.importorskip("peft")
    vs = load_script("vs_peft")
    rows, ratios = vs.main(TINY + ["--r", "2", "--out_dir", str(tmp_path)])
    trainable = {r["name"]: r["trainable"] for r in rows}
    assert trainable["ours-lora"] == trainable["ours-lora-plain"] == trainable["peft-lora"] == LORA_R2
    assert trainable["ours-full"] == trainable["ours-full-plain"] == trainable["hf-full"]
    assert {w for w, _ in ratios} >= {"ours-lora-plain / peft-lora (the same loss path)",
                                      "ours-full-plain / hf-full (the same loss path)", "ours-lora / ours-full"}
    assert (tmp_path / "cpu_vs_peft.md").exists()


@pytest.mark.slow  # starts processes
@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc/stat")
def test_timings_taken_while_another_process_burns_cpu_are_thrown_away(monkeypatch):
    monkeypatch.setattr(timing, "CHUNK_S", 0.2)
    # one busy core is 1/cpu_count of the machine: half of that is the limit, whatever the core count
    monkeypatch.setattr(timing, "NOISE_LIMIT", 0.5 / (os.cpu_count() or 1))
    hog = subprocess.Popen([sys.executable, "-c", "print('busy', flush=True)\nwhile True: pass"],  # one core busy
                           stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout.readline() == "busy\n"  # it is past its start-up (slow on a loaded machine) and spinning
        _, info = timing.time_phases([lambda: time.sleep(0.01)], "cpu", warmup=0, iters=1)
    finally:
        hog.kill()
        hog.wait()
        hog.stdout.close()
    assert info["noisy"] and info["discarded"] > 0


@pytest.mark.slow  # starts processes
def test_memory_bench_writes_measured_and_predicted_peaks_and_interleaved_ratios(tmp_path):
    tiny = TINY[:TINY.index("--B")] + TINY[TINY.index("--iters"):]  # the batch comes from --shapes
    cmd = [sys.executable, "bench/memory.py", *tiny, "--shapes", "2x16", "--modes", "lora,lora-ckpt",
           "--chunk", "8", "--compare", "--compare_iters", "1", "--noise_limit", "1", "--out_dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    saved = json.loads((tmp_path / "cpu_memory.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["lora 2x16", "lora-ckpt 2x16"]
    assert all(r["measured"] == r["peak_mem"] - saved["idle_rss"] and r["predicted"] > 0 for r in saved["rows"])
    ratios = saved["compare"]["ratios"]  # glibc's threshold where a running job's ends up, then the fixed one
    assert list(ratios) == ["lora-plain, glibc threshold 32 MiB", "lora, glibc threshold 32 MiB",
                            "lora-recompute, glibc threshold 32 MiB", "lora-ckpt, glibc threshold 32 MiB",
                            "lora, threshold fixed at 64 KiB"]
    assert ratios["lora-plain, glibc threshold 32 MiB"] == 1.0


def test_rank_sweep_dora_rows_train_the_magnitudes_too(tmp_path):
    sweep = load_script("lora_rank_sweep")
    rows = sweep.main(TINY + ["--ranks", "2", "--modes", "split,dora,dora_fused", "--inprocess",
                              "--out_dir", str(tmp_path)])
    assert [r["name"] for r in rows] == ["split-r2", "dora-r2", "dora_fused-r2"]
    magnitudes = 96 + 32 + 128 + 32  # one per output feature of each adapted layer
    assert [r["trainable"] for r in rows] == [LORA_R2, LORA_R2 + magnitudes, LORA_R2 + magnitudes]


def test_named_adapters_bench_times_three_models_and_the_switch(tmp_path):
    bench = load_script("named_adapters")
    rows = bench.main(TINY + ["--rounds", "1", "--r", "2", "--out_dir", str(tmp_path)])
    assert [r["name"] for r in rows] == ["before", "single", "named"]
    assert json.loads((tmp_path / "cpu_named_adapters.json").read_text())["rows"][-1]["switch_ms"] > 0


def test_vs_peft_on_a_llama_folder_trains_the_same_lora_parameters_as_peft(tmp_path):
    pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    vs = load_script("vs_peft")
    rows, _ = vs.main(["--model", str(tmp_path / "llama"), "--B", "1", "--T", "16", "--iters", "1", "--warmup", "0",
                       "--threads", "1", "--r", "2", "--out_dir", str(tmp_path)])
    trainable = {r["name"]: r["trainable"] for r in rows}
    # r=2 on all seven linears of the one block (q 32->32, k and v 32->16, o 32->32, gate and up 32->64, down 64->32)
    assert trainable["ours-lora"] == trainable["peft-lora"] == 2 * (64 + 2 * 48 + 64 + 2 * 96 + 96)
    assert (tmp_path / "cpu_vs_peft_llama.md").exists()


@pytest.mark.slow  # starts ten processes
def test_train_vs_peft_times_train_py_and_a_peft_loop_on_one_model_and_one_batch_shape(tmp_path):
    pytest.importorskip("peft")
    from test_llama import make_hf_llama
    from test_train import write_shards
    make_hf_llama(tmp_path / "llama", vocab_size=128)
    write_shards(tmp_path / "data")
    tvp = load_script("train_vs_peft")
    table, ratios = tvp.main(["--model", str(tmp_path / "llama"), "--data_dir", str(tmp_path / "data"), "--B", "1",
                              "--T", "16", "--r", "2", "--steps", "4", "--rounds", "2", "--threads", "1",
                              "--out_dir", str(tmp_path / "results")])
    assert [r["row"] for r in table] == list(tvp.ROWS)
    assert all(len(r["rounds"].split()) == 2 and r["median_ms"] > 0 for r in table)
    assert set(ratios) == {f"{a} / {b}" for a, b in tvp.RATIOS}
    assert "commit" in (tmp_path / "results" / "cpu_train_vs_peft_llama.md").read_text()


def test_generate_bench_times_both_sides_on_the_same_tokens(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      initializer_range=0.2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    bench = load_script("generate")
    rows = bench.main(["--model", str(tmp_path / "llama"), "--batch_sizes", "1,3", "--prompt_len", "6",
                       "--new_tokens", "5", "--iters", "2", "--warmup", "0", "--threads", "1",
                       "--out_dir", str(tmp_path)])
    assert [r["batch"] for r in rows] == [1, 3]
    assert [r["rows_equal"] for r in rows] == ["1/1", "3/3"]  # greedy on the same weights: the same tokens
    assert all(r["ours_tok_s"] > 0 and r["theirs_tok_s"] > 0 and r["ratio"] > 0 for r in rows)
    assert (tmp_path / "cpu_generate_llama.md").exists()
