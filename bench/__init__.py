"""Benchmarks (python bench/lora_rank_sweep.py, fused_vs_split.py, vs_peft.py); shared harness: timing.py."""
