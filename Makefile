# ftcourse: two entry points, `make book` and `make test`. Both build the environment first.
#
#   make env    create .venv (if missing) and install ftcourse with the pinned CPU stack
#   make book   execute every chapter and build the HTML book into _build/html
#   make test   lint, format check, unit tests and every chapter under nbmake
#   make freeze re-pin constraints-cpu.txt from the current .venv
#
# The environment is rebuilt only when pyproject.toml or constraints-cpu.txt change (stamp file).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ftcourse-env.stamp
TORCH_VERSION := 2.13.0
CONSTRAINTS := constraints-cpu.txt

# Chapters start kernels with the venv's Python and call its tools; put it first on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: env book test lint freeze clean

env: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@echo "Setting up $(VENV) (a few minutes on a fresh machine)..."
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet --progress-bar off "torch==$(TORCH_VERSION)"
	@# llama-cpp-python has no wheel for this machine: pip builds it (4-10 min once, then its wheel cache).
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" \
	  $(BIN)/python -m pip install --quiet --progress-bar off -e ".[book,test,deploy]" -c $(CONSTRAINTS)
	@touch $@

book: env
	$(BIN)/jupyter-book build --all -W -n --keep-going .
	@echo "Open _build/html/index.html"

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

# Re-pin the known-good stack after a dependency change (then commit constraints-cpu.txt).
freeze: env
	@{ sed -n '1,/^# torch/p' $(CONSTRAINTS); \
	   $(BIN)/python -m pip freeze --all --exclude-editable \
	   | grep -viE '^(pip|setuptools|wheel|ftcourse)([=@ ]|$$)'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	@touch $(STAMP)

clean:
	rm -rf _build .pytest_cache .ruff_cache
	find book -name '.*.nbmake.ipynb' -delete
