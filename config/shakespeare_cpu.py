# A small GPT trained from scratch on Shakespeare's plays, in a few minutes on 2 CPU cores.
# First: python fineweb.py --source shakespeare   (writes data/shakespeare)
out_dir = "out-shakespeare"
data_dir = "data/shakespeare"
device = "cpu"
dtype = "float32"
compile = False

# 4 layers x 128 channels: ~0.8M parameters in the blocks, 6.4M in the (tied) 50304-token embedding
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64
dropout = 0.0

batch_size = 8
total_batch_size = 1024  # tokens per step: 2 micro-steps of 8 x 64
max_steps = 300
warmup_steps = 30
max_lr = 3e-3  # small models tolerate (and need) a larger lr
min_lr = 3e-4
weight_decay = 0.1

eval_interval = 100
eval_iters = 10
sample_interval = 150
sample_prompt = "ROMEO:"
sample_tokens = 48
checkpoint_interval = 100
log_interval = 20
