# make run: set up and run the main job (a real CIFAR-10 sweep, a few minutes on 2 CPU cores).
# make test: set up (with dev extras) and run the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED_DATA := $(abspath ../shared/datasets/cifar10-jpeg)
ifneq ($(wildcard $(SHARED_DATA)/train),)
export NORMBENCH_DATA ?= $(SHARED_DATA)
endif

.PHONY: run test test-all setup bench reference clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# then the C++ ports of the layers' training steps (normbench/norms/native.py): built once here, not in a test or run
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/python -c 'from normbench.norms import native; native.main()'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/normbench experiment=quick

# one test process per core (pytest-xdist); each test's torch runs on one thread (tests/conftest.py)
TEST_WORKERS ?= auto
test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

test-all: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "slow or not slow"

# make reference PRESET=gn_fig1_cpu: a reference result in results/<preset>/ (lr tuned on a validation split,
# 3 seeds; hours on 2 CPU cores, two one-thread jobs at a time); stopped, the same command resumes it
REFERENCE_ARGS ?= hydra/launcher=local_parallel
reference: setup
	$(BIN)/python scripts/reference.py $(PRESET) $(REFERENCE_ARGS)

# make bench [BENCH_OUT=results/bench/cpu2.md] [BENCH_ARGS=...]: the throughput tables and targets, in one process: every
# norm at the defaults vs fp32/contiguous and vs BN, memory formats under bf16, FLOP/s against the peak, ghost BN,
# the runner vs pure compute and a DataLoader, memory (quiet machine: about 10 min on 2 CPU cores)
bench: setup
	$(BIN)/python scripts/bench.py $(if $(BENCH_OUT),--out $(BENCH_OUT)) $(BENCH_ARGS)

clean:
	rm -rf runs outputs multirun
