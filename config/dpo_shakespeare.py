# LoRA DPO on preference pairs from the Shakespeare corpus: the true continuation of a speech over another's
# (shakespeare_pairs.py; `make dpo` runs all of it)
#   python shakespeare_pairs.py                        -> data/shakespeare_pairs/{train,val}.jsonl
#   python prepare_sft.py --input data/shakespeare_pairs/train.jsonl --val data/shakespeare_pairs/val.jsonl \
#       --out data/shakespeare_pairs/dpo --block_size 64
#   python train.py config/dpo_shakespeare.py
# The reference is the base itself: the LoRA adapter switched off (dpo_reference='adapter_off', the LoRA default).
init_from = "out-shakespeare"
out_dir = "out-dpo-shakespeare"
data_dir = "data/shakespeare_pairs/dpo"
objective = "dpo"
dpo_beta = 0.1
dpo_loss = "sigmoid"
device = "cpu"
dtype = "float32"
compile = False
block_size = 64

lora_r = 16
lora_alpha = 32.0
lora_targets = ("c_attn", "c_proj", "c_fc",  # GPT-2 names; LLaMA names below (a base has one set)
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

batch_size = 8  # pairs per micro-batch (16 rows: 8 chosen, 8 rejected)
total_batch_size = 1024  # 2 micro-steps of 8 pairs: 16 pairs per step
max_steps = 90  # ~1 epoch of the 1,465 training pairs
warmup_steps = 0
max_lr = 2e-3
min_lr = 2e-4
weight_decay = 0.0

eval_interval = 45
eval_iters = 0  # 0: every val pair (363)
sample_interval = 0
checkpoint_interval = 45
log_interval = 10
