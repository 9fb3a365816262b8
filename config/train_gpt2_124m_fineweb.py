# GPT-2 124M on FineWeb-Edu sample-10BT: build-nanogpt's recipe (~10B tokens = 1 epoch).
#   python fineweb.py --source fineweb-edu        (downloads and writes data/edu_fineweb10B)
#   torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2_124m_fineweb.py
out_dir = "out-gpt2-124m"
data_dir = "data/edu_fineweb10B"

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
vocab_size = 50304

batch_size = 64  # micro-batch per GPU; lower it (e.g. 16) if it does not fit, accumulation makes up the rest
total_batch_size = 524288  # 2**19 tokens, ~0.5M as in GPT-3 small
max_steps = 19073  # 10e9 tokens / 2**19
warmup_steps = 715  # GPT-3: warm up over 375M tokens
max_lr = 6e-4
min_lr = 6e-5
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 250
eval_iters = 20
hellaswag_every = 250
sample_interval = 250
sample_prompt = "Hello, I'm a language model,"
checkpoint_interval = 5000
compile = True
dtype = "auto"  # bf16 autocast on CUDA
wandb_log = False
wandb_run_name = "gpt2-124m"
