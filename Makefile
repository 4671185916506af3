# Two entry points for a fresh machine: `make demo` (set up + run the shipped example, offline)
# and `make test` (set up + run the test suite). Both create .venv when it is missing.
# Tests that need data outside the repository (stories260K in ../shared, SmolLM2 in ../cache/smollm2,
# Graphviz's dot) are skipped when it is absent, with one line saying so; CI=true makes that a failure.
# `make fixtures` builds the SmolLM2 folder from ../shared (pip access to PyPI needed).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test fixtures bench clean

$(BIN)/atpdsl: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c .ci/constraints.txt -e '.[test]'
	touch $(BIN)/atpdsl

setup: $(BIN)/atpdsl

demo: setup
	$(BIN)/atpdsl run examples/induction.atp --out out/demo

test: setup
	$(BIN)/python -m pytest -q

SMOLLM2_BUILD := ../shared/models/smollm2/build.py
SMOLLM2_DIR := ../cache/smollm2

fixtures: setup
	@test -f $(SMOLLM2_BUILD) || { echo "no $(SMOLLM2_BUILD): put the project's shared test data at ../shared first"; exit 1; }
	$(BIN)/python -m pip install -q gguf
	$(BIN)/python $(SMOLLM2_BUILD) $(SMOLLM2_DIR)

bench: setup
	$(BIN)/python benchmarks/bench_atp.py

clean:
	rm -rf $(VENV) out .pytest_cache
