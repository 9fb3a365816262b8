# LoRA fine-tuning of SmolLM2-135M-Instruct on a task: who speaks these lines? (`make sft` runs all of it)
#   make smollm2                                         -> models/smollm2-135m-instruct
#   python -m tasks.shakespeare_speakers                       -> data/shakespeare_speakers/{train,val}.jsonl
#   python prepare_sft.py --input data/shakespeare_speakers/train.jsonl --val data/shakespeare_speakers/val.jsonl \
#       --out data/shakespeare_speakers/sft --block_size 64 --tokenizer models/smollm2-135m-instruct
#   python train.py config/sft_shakespeare_speakers.py
#   python sft_eval.py --data data/shakespeare_speakers/sft --model models/smollm2-135m-instruct \
#       --model out-sft-speakers
# The base is one setting: init_from (prepare the data with that base's tokenizer: --tokenizer <its folder>, or none
# for GPT-2's, as our from-scratch `make shakespeare` base uses; that 7M base wants max_lr=6e-3).
init_from = "models/smollm2-135m-instruct"
out_dir = "out-sft-speakers"
data_dir = "data/shakespeare_speakers/sft"
objective = "sft"
packing = True
device = "cpu"
dtype = "float32"
compile = False
block_size = 64

peft_method = "lora"
lora_r = 16
lora_alpha = 32.0
lora_targets = ("c_attn", "c_proj", "c_fc",  # GPT-2 names; LLaMA names below (a base has one set)
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

batch_size = 8
total_batch_size = 512  # one micro-step of 8 rows x 64 positions, ~12 examples
max_steps = 60  # ~720 of the 1,991 training examples: minutes on 2 CPU cores
warmup_steps = 5
max_lr = 2e-3
min_lr = 2e-4
weight_decay = 0.0

eval_interval = 30
eval_iters = 0  # 0: the whole val split
eval_generate_every = 60  # exact match: step 0 (the untuned base) and the end
eval_generate_limit = 60  # the first 60 val prompts (sft_eval.py scores all 495)
sample_interval = 0
checkpoint_interval = 60
log_interval = 10
