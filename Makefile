# fedenc developer entry points. Every target bootstraps .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.stamp-install
DATA   ?= ../shared/data
BENCH_ARGS ?=

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: venv demo test lint format bench bench-accuracy clean proto

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on local disk. A bare `torch` requirement would
	# otherwise pull a multi-GB CUDA build. An existing torch (e.g. a CUDA one) is kept.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedenc simulate simulations/quickstart.toml --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check fedenc nodes tests benchmarks examples
	$(BIN)/ruff format --check fedenc nodes tests benchmarks examples
	$(BIN)/mypy fedenc

format: $(STAMP)
	$(BIN)/ruff check --fix fedenc nodes tests benchmarks examples
	$(BIN)/ruff format fedenc nodes tests benchmarks examples

bench: $(STAMP)
	$(BIN)/python benchmarks/batching.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/speed.py --data $(DATA) $(BENCH_ARGS)
	$(BIN)/python benchmarks/train_floor.py --data $(DATA)
	$(BIN)/python benchmarks/skip_rnn.py

# Tens of minutes on 2 cores: the accuracy table of the README.
bench-accuracy: $(STAMP)
	$(BIN)/python benchmarks/accuracy.py --data $(DATA)

# Regenerates the committed protobuf code (fedenc/proto) from proto/; see fedenc/protocol/codegen.py.
proto: $(STAMP)
	$(BIN)/python -m fedenc.protocol.codegen

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
