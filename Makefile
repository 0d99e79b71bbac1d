# FedContrast: set-up, the main job, tests. `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Extra arguments for pytest, e.g. `make test PYTEST_ARGS="-k queue -x"`.
PYTEST_ARGS ?=
# Test files run in up to 2 processes, one file per process at a time (pytest-xdist): in one
# process the suite keeps less than one core busy, the end-to-end tests waiting on Flower
# processes and Ray to start. In one process: `make test PYTEST_WORKERS=`.
PYTEST_WORKERS ?= -n auto --maxprocesses=2 --dist loadfile

.PHONY: help setup demo test lint bench proto clean

help:
	@echo "make demo   set up .venv if needed, then simulate a 10-client federation on the embedded digits data"
	@echo "make test   set up .venv if needed, then run the whole test suite"
	@echo "make setup  create .venv: torch==2.13.0 when no torch is present, then the project [dev]"
	@echo "make lint   ruff over the project"
	@echo "make proto  regenerate proto/negatives_pb2*.py from proto/negatives.proto"
	@echo "make bench  run the quick benchmarks (results in bench/results/)"
	@echo "make clean  remove runs/ and .pytest_cache (.venv stays)"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "FedContrast needs Python >= 3.11 (flwr does); set PYTHON=python3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/fedcontrast simulate --dataset digits --timeout 1800

test: setup
	$(BIN)/python -m pytest $(PYTEST_WORKERS) $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

proto: setup
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. proto/negatives.proto

bench: setup
	$(BIN)/python -m bench.loss_bench
	$(BIN)/python -m bench.queue_bench
	$(BIN)/python -m bench.fab_bench
	$(BIN)/python -m bench.digits_load_bench
	$(BIN)/python -m bench.cli_start_bench

clean:
	rm -rf runs .pytest_cache
