# Fresh-clone entry points (see README): `make demo` and `make test`.
# Both create .venv on first use: torch from the pinned release first (on this project's
# machines it is installed from local disk), then this package with its test extra.
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

demo: setup
	$(BIN)/accelerate launch recipes/stage1.py && $(BIN)/accelerate launch recipes/stage2.py
