# Two commands on a fresh machine:
#   make shakespeare   set up, prepare the Shakespeare shards, train config/shakespeare_cpu.py on CPU
#   make test          set up (with the test-only references transformers + peft) and run the tests
PYTHON ?= python3
VENV ?= .venv
# torch first, on its own: pick the build for your machine, e.g. TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup setup-dev shakespeare data finetune test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.setup: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.setup-dev: $(VENV)/.setup requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.setup
setup-dev: $(VENV)/.setup-dev

data: setup
	$(BIN)/python fineweb.py --source shakespeare

# these targets re-run from the start: they replace the run in their out_dir (--overwrite=True) and say so
shakespeare: data
	@echo "make shakespeare: training into out-shakespeare/, replacing any run there"
	$(BIN)/python train.py config/shakespeare_cpu.py --overwrite=True

finetune: setup
	$(BIN)/python fineweb.py --source shakespeare-romances
	@echo "make finetune: training into out-shakespeare-lora/, replacing any run there"
	$(BIN)/python train.py config/finetune_shakespeare_lora.py --overwrite=True

test: setup-dev
	$(BIN)/python -m pytest tests -q

bench: setup
	$(BIN)/python bench/lora_rank_sweep.py

clean:
	rm -rf $(VENV) out-* data/shakespeare
