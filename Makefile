# Two entry points for a fresh machine:
#   make serve   create .venv, install the service, start it on the bundled model
#   make test    create .venv, install the dev tools, run lint, types and the test suite
# Both are idempotent: the venv is (re)built only when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra pip arguments, e.g. PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for CPU-only torch.
PIP_ARGS ?=

.PHONY: serve test lint typecheck pytest test-container train evaluate bench bench-check bench-peers bench-train clean help

help:
	@echo "make serve   set up and start the service on http://127.0.0.1:8000 (the bundled model)"
	@echo "make test    set up and run ruff, mypy and the whole test suite (container suite included)"
	@echo "make test-container   only the container suite: build the image, run it (docs/deploy.md)"
	@echo "make train   retrain with the default recipe (DATA_DIR=../shared/data) and publish"
	@echo "make bench   the HTTP benchmark: the service against its peers (docs/performance.md)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-runtime: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) -e .
	touch $@

$(VENV)/.installed-train: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) -e '.[train]'
	touch $(VENV)/.installed-runtime $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) -e '.[dev,bench]'
	touch $(VENV)/.installed-runtime $(VENV)/.installed-train $@

serve: $(VENV)/.installed-runtime
	$(BIN)/python -m app

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

pytest: $(VENV)/.installed-dev
	bash scripts/test-deps.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# tests/container builds the image and runs it with Podman or Docker (skips without a working
# engine). Leave it out of a run with PYTEST_ARGS='-m "not container"'.
test-container: $(VENV)/.installed-dev
	bash scripts/test-deps.sh
	$(BIN)/python -m pytest -m container $(PYTEST_ARGS)

DATA_DIR ?= ../shared/data
train: $(VENV)/.installed-train
	$(BIN)/python -m training.train --data-dir $(DATA_DIR)

evaluate: $(VENV)/.installed-train
	$(BIN)/python -m training.evaluate --data-dir $(DATA_DIR)

# BENCH_ARGS=--quick for a sanity run, --record to make the run the one docs/performance.md shows;
# any `python -m bench` option works (python -m bench --help).
bench: $(VENV)/.installed-dev
	PYTHON=$(BIN)/python bash bench/run.sh $(BENCH_ARGS)

# docs/performance.md against the recorded run (bench/recorded.json).
bench-check: $(VENV)/.installed-dev
	$(BIN)/python -m bench.report --check

# Build the peers' venvs (Triton, MLServer, BentoML, Ray Serve) ahead of a run.
bench-peers:
	$(PYTHON) -m bench.venvs

bench-train: $(VENV)/.installed-dev
	$(BIN)/python -m bench.train_bench --data-dir $(DATA_DIR)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
