# make train [ARGS="quant=fp32 trainer.max_epochs=3"]   make test   make lint   make bench
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup train test lint bench clean

setup: $(STAMP)

# (Re)install only when pyproject.toml or the pins changed; `pip install -e` keeps the sources
# live. constraints.txt holds the versions CI ran (the Dockerfile installs with it too).
$(STAMP): pyproject.toml constraints.txt constraints-torch.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -c constraints-torch.txt -c constraints.txt -e '.[app,dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/python train.py $(ARGS)

test: $(STAMP) lint
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	$(BIN)/shellcheck scripts/slurm/train.sbatch scripts/*.sh .ci/run

bench: $(STAMP)
	$(BIN)/python scripts/bench.py $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
