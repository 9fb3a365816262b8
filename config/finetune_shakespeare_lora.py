# LoRA fine-tuning of the Shakespeare base on plays it has never seen: the late romances.
#   python train.py config/shakespeare_cpu.py                 (the base, in out-shakespeare)
#   python fineweb.py --source shakespeare-romances           (Pericles, Cymbeline, The Winter's Tale; val: The Tempest)
#   python train.py config/finetune_shakespeare_lora.py
# Any Hugging Face GPT-2 folder works as the base too: --init_from=path/to/gpt2 (then use block_size<=1024).
out_dir = "out-shakespeare-lora"
init_from = "out-shakespeare"
data_dir = "data/shakespeare_romances"
device = "cpu"
dtype = "float32"
compile = False
block_size = 64

# LoRA on every projection of the blocks; the base (and the tied embedding) stays frozen
peft_method = "lora"
lora_r = 8
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = ("c_attn", "c_proj", "c_fc")
lora_mode = "split"
merge_on_save = True

batch_size = 8
total_batch_size = 1024
max_steps = 150
warmup_steps = 10
max_lr = 3e-3
min_lr = 3e-4
weight_decay = 0.0

eval_interval = 50
eval_iters = 10
sample_interval = 150
sample_prompt = "LEONTES:"
sample_tokens = 48
checkpoint_interval = 50
log_interval = 10
