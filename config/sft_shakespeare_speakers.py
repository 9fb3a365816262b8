# LoRA fine-tuning on a task: who speaks these lines? (shakespeare_speakers.py; `make sft` runs all of it)
#   python shakespeare_speakers.py                       -> data/shakespeare_speakers/{train,val}.jsonl
#   python prepare_sft.py --input data/shakespeare_speakers/train.jsonl --val data/shakespeare_speakers/val.jsonl \
#       --out data/shakespeare_speakers/sft --block_size 64
#   python train.py config/sft_shakespeare_speakers.py
#   python sft_eval.py --data data/shakespeare_speakers/sft --model out-shakespeare --model out-sft-speakers
# The base is one setting: init_from (with a Hugging Face LLaMA, prepare the data with --tokenizer <its folder>).
init_from = "out-shakespeare"
out_dir = "out-sft-speakers"
data_dir = "data/shakespeare_speakers/sft"
objective = "sft"
packing = True
device = "cpu"
dtype = "float32"
compile = False
block_size = 64

lora_r = 16
lora_alpha = 32.0
lora_targets = ("c_attn", "c_proj", "c_fc",  # GPT-2 names; LLaMA names below (a base has one set)
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

batch_size = 8
total_batch_size = 1024  # 2 micro-steps of 8 rows x 64 positions, ~17 examples each
max_steps = 100  # ~1.4 epochs of the 1,991 training examples
warmup_steps = 10
max_lr = 6e-3
min_lr = 6e-4
weight_decay = 0.0

eval_interval = 50
eval_iters = 0  # 0: the whole val split
eval_generate_every = 50  # exact match: step 0 (the untuned base), 50 and the end
eval_generate_limit = 100  # the first 100 val prompts (sft_eval.py scores all 495)
sample_interval = 0
checkpoint_interval = 50
log_interval = 20
