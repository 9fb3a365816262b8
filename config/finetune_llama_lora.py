# LoRA fine-tuning of a LLaMA checkpoint: r=16, alpha=16 on q_proj, k_proj, v_proj, o_proj.
# Token ids must be the checkpoint's own, so make the shards with its tokenizer.json (needs `pip install tokenizers`):
#   python fineweb.py --source shakespeare-romances --tokenizer meta-llama/Llama-3.2-1B
#       -> data/shakespeare_romances_Llama-3.2-1B   (a local folder works too: --tokenizer path/to/Llama-3.2-1B)
#   python train.py config/finetune_llama_lora.py     (one GPU; torchrun for several)
# For the MLP too: --lora_targets='("q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj")'
out_dir = "out-llama-lora"
init_from = "meta-llama/Llama-3.2-1B"  # a local Hugging Face folder, or a hub name in the HF cache
data_dir = "data/shakespeare_romances_Llama-3.2-1B"

peft_method = "lora"
lora_r = 16
lora_alpha = 16.0
lora_dropout = 0.05
lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
lora_mode = "split"  # dropout > 0 needs split; use lora_dropout=0.0 with lora_mode="fused"

block_size = 512
batch_size = 4
total_batch_size = 16384  # 8 micro-steps of 4 x 512 on one GPU
max_steps = 200
warmup_steps = 20
max_lr = 2e-4
min_lr = 2e-5
weight_decay = 0.0

eval_interval = 50
eval_iters = 10
sample_interval = 100
sample_prompt = "LEONTES:"
checkpoint_interval = 100
dtype = "auto"  # bf16 autocast on CUDA
compile = True
