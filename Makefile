# Set-up on a fresh machine: `make demo` (the main job on the embedded default) and `make test` (all tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision versions that install from this machine's local disk; pip picks them for the ranges in pyproject
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint install install-dev clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/prunekit demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs build *.egg-info
