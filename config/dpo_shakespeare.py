# LoRA DPO of SmolLM2-135M-Instruct on preference pairs from the Shakespeare corpus: the true continuation of a
# speech over another's (shakespeare_pairs.py; `make dpo` runs all of it)
#   make smollm2                                       -> models/smollm2-135m-instruct
#   python -m tasks.shakespeare_pairs                        -> data/shakespeare_pairs/{train,val}.jsonl
#   python prepare_sft.py --input data/shakespeare_pairs/train.jsonl --val data/shakespeare_pairs/val.jsonl \
#       --out data/shakespeare_pairs/dpo --block_size 64 --tokenizer models/smollm2-135m-instruct
#   python train.py config/dpo_shakespeare.py
#   python dpo_eval.py out-dpo-shakespeare                  (held-out reward accuracy before and after)
# The reference is the base itself: the LoRA adapter switched off (dpo_reference='adapter_off', the LoRA default).
# Another base is one setting: init_from (prepare the pairs with its tokenizer, or none for GPT-2's).
init_from = "models/smollm2-135m-instruct"
out_dir = "out-dpo-shakespeare"
data_dir = "data/shakespeare_pairs/dpo"
objective = "dpo"
dpo_beta = 0.1
dpo_loss = "sigmoid"
device = "cpu"
dtype = "float32"
compile = False
block_size = 64

peft_method = "lora"
lora_r = 16
lora_alpha = 32.0
lora_targets = ("c_attn", "c_proj", "c_fc",  # GPT-2 names; LLaMA names below (a base has one set)
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

batch_size = 8  # pairs per micro-batch (16 rows: 8 chosen, 8 rejected)
total_batch_size = 512  # one micro-step of 8 pairs (block_size 64 x 8) per step
max_steps = 40  # 320 of the 1,465 training pairs: minutes on 2 CPU cores
warmup_steps = 0
max_lr = 1e-3
min_lr = 1e-4
weight_decay = 0.0

eval_interval = 20
eval_iters = 20  # 160 of the 363 val pairs (eval_iters=0: all of them)
sample_interval = 0
checkpoint_interval = 40
log_interval = 10
