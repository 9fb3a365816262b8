# DPO in the shape of the HA-DPO recipe (LoRA r=128, alpha=256 on every linear layer, beta 0.1, cosine, no
# warmup) for a LLaMA folder, on one GPU; the reference is the model with its adapter off (no second copy).
#   python prepare_sft.py --input pairs_train.jsonl --val pairs_val.jsonl --out data/my-pairs \
#       --tokenizer /path/to/llama --block_size 1024
#   python train.py config/dpo_llama_hadpo.py --init_from=/path/to/llama --data_dir=data/my-pairs
# (torchrun --standalone --nproc_per_node=8 train.py ... splits the pairs over 8 GPUs.)
init_from = "/path/to/llama"  # a Hugging Face LLaMA folder (config.json, *.safetensors, tokenizer.json)
out_dir = "out-dpo-llama"
data_dir = "data/my-pairs"
objective = "dpo"
dpo_beta = 0.1
dpo_loss = "sigmoid"
dpo_reference = "adapter_off"

peft_method = "lora"
lora_r = 128
lora_alpha = 256.0
lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # all linear layers

block_size = 1024
batch_size = 1  # pairs per micro-batch (2 rows)
total_batch_size = 1024 * 16  # 16 pairs per optimizer step (over accumulation and GPUs)
max_steps = 1000
warmup_steps = 0  # no warmup, cosine decay
max_lr = 2e-6
min_lr = 0.0
weight_decay = 0.0
grad_clip = 1.0

eval_interval = 100
eval_iters = 0
sample_interval = 0
checkpoint_interval = 200
log_interval = 10
