# LoRA GRPO of SmolLM2-135M-Instruct on one-digit sums and products (tasks/arithmetic.py; `make grpo` runs all of it)
#   make smollm2                                       -> models/smollm2-135m-instruct
#   python -m tasks.arithmetic --out data/arithmetic   -> data/arithmetic/{train,val}.jsonl
#   python prepare_sft.py --input data/arithmetic/train.jsonl --val data/arithmetic/val.jsonl \
#       --out data/arithmetic/grpo --block_size 48 --tokenizer models/smollm2-135m-instruct
#   python train.py config/grpo_smollm2.py
#   python grpo_eval.py out-grpo-arithmetic            (held-out greedy accuracy before and after)
# Each step samples grpo_num_generations completions of batch_size prompts, rewards each (the last number of the
# completion equals the answer), and moves the adapter toward the completions better than their group's mean. The
# KL's reference is the base itself: the LoRA adapter switched off.
init_from = "models/smollm2-135m-instruct"
out_dir = "out-grpo-arithmetic"
data_dir = "data/arithmetic/grpo"
objective = "grpo"
grpo_num_generations = 8
grpo_max_new_tokens = 4  # an answer of one or two digits and <|im_end|>; longer ones are cut (and wrong)
grpo_temperature = 1.0
grpo_beta = 0.04
grpo_loss_type = "dapo"
grpo_reward = "numeric"
device = "cpu"
dtype = "float32"
compile = False
block_size = 48  # the 40-token prompts + 4 new tokens, less 1

peft_method = "lora"
lora_r = 16
lora_alpha = 32.0
lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

batch_size = 2  # prompts per micro-batch: 2 x 8 = 16 completions
total_batch_size = 96  # one micro-step (batch_size 2 x block_size 48) per step
max_steps = 20  # 40 of the 160 training prompts, 320 completions: about 10 minutes on 2 idle CPU cores
warmup_steps = 0
max_lr = 5e-4
min_lr = 5e-5
weight_decay = 0.0

eval_interval = 20  # the held-out greedy accuracy at step 0 (the base) and at the end
eval_iters = 0  # all 40 val prompts
sample_interval = 0
checkpoint_interval = 20
log_interval = 1
