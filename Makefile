# Two entry points for a fresh machine: `make demo` (set up + run the shipped example, offline)
# and `make test` (set up + run the test suite). Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test bench clean

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

bench: setup
	$(BIN)/python benchmarks/bench_atp.py

clean:
	rm -rf $(VENV) out .pytest_cache
