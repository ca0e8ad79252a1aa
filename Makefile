# Every target creates .venv when it is missing and runs inside it.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export MLFLOW_DISABLE_TELEMETRY := true
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: install sweep test test-fast lint format bench ui clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

sweep: $(STAMP)  ## the offline quickstart sweep (digits, no downloads)
	$(BIN)/tlsweep sweep quickstart

test: $(STAMP)  ## lint, the whole suite (slow tests included), then the backend tests on JAX (CI)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -m "slow or not slow"
	KERAS_BACKEND=jax $(BIN)/python -m pytest -m backend -p no:cacheprovider

test-fast: $(STAMP)  ## the default suite: everything but the slow tests
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(STAMP)
	$(BIN)/ruff check --fix src tests bench
	$(BIN)/ruff format src tests bench

bench: $(STAMP)  ## benchmarks (not part of the tests); figures go to bench/RESULTS.md
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.load
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.memory
	$(BIN)/python -m bench.gpu --images 200 --size 64 --epochs 2  # on a GPU: no arguments

ui: $(STAMP)
	$(BIN)/tlsweep ui

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
