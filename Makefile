# Fresh-clone entry points (see README): `make demo` and `make test`.
# Both create .venv on first use: torch first (TORCH_SPEC; the pinned release is a CUDA build of
# several GB on x86_64 -- see the README for a CPU-only one), then this package with its test extra.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin

.PHONY: setup test demo

$(BIN)/.qformer-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/.qformer-installed

test: setup
	$(BIN)/python -m pytest -q

# One process, started with python: the recipes are accelerate scripts (accelerate launch runs
# them on many processes), and one process needs no launcher.
demo: setup
	$(BIN)/python recipes/stage1.py && $(BIN)/python recipes/stage2.py
