# genfast: `make test` and `make bench` work on a fresh machine that has only python3.
# Where python3 already imports torch (the GPU machines, which have no package index), that
# environment is used as it is; elsewhere a .venv is created with torch==2.13.0 (CPU) and the rest.

SHELL := /bin/bash
PY ?= python3
VENV := .venv
NVCC ?= $(or $(shell command -v nvcc 2>/dev/null),$(wildcard /usr/local/cuda/bin/nvcc))
HAVE_SYSTEM_TORCH := $(shell $(PY) -c "import torch" >/dev/null 2>&1 && echo yes)

ifeq ($(HAVE_SYSTEM_TORCH),yes)
PYTHON := $(PY)
ENV_STAMP :=
else
PYTHON := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.deps-installed
endif

CSRC := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
BUILD_STAMP := build/.genfast-built
PYTEST_ARGS ?=

.PHONY: test bench build cuda-check lint info clean help

help:
	@echo "make test    build genfast (and its extension), compile-check the CUDA sources, run the tests"
	@echo "make bench   run the benchmark suite on the device present; results in benchmarks/results/"
	@echo "make info    what genfast sees here: versions, extension, GPU, backends per op"
	@echo "make lint    ruff (part of make test)"

$(VENV)/.deps-installed: requirements-dev.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet torch==2.13.0
	$(VENV)/bin/python -m pip install --quiet -r requirements-dev.txt
	touch $@

# The editable install builds genfast._C in place (C++ CPU kernels; CUDA too where torch has it).
$(BUILD_STAMP): $(ENV_STAMP) $(CSRC) setup.py pyproject.toml
	MAX_JOBS=$${MAX_JOBS:-4} $(PYTHON) -m pip install --quiet --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

build: $(BUILD_STAMP)

# Where nvcc exists but torch has no CUDA, compile every .cu for sm_90a (and sm_80) and syntax-check
# the torch bindings, so the CUDA code cannot rot unseen on CPU-only machines.
cuda-check: $(ENV_STAMP)
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: no nvcc here, skipped"; else \
	  PYTHON=$(PYTHON) NVCC=$(NVCC) bash tests/cuda_compile_check.sh; fi

lint: $(ENV_STAMP)
	@if $(PYTHON) -m ruff --version >/dev/null 2>&1; then $(PYTHON) -m ruff check genfast benchmarks tests; \
	  else echo "lint: ruff not installed here, skipped"; fi

test: build cuda-check lint
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)

bench: build
	$(PYTHON) -m benchmarks.run $(BENCH_ARGS)

info: build
	$(PYTHON) -m genfast info

clean:
	rm -rf build genfast/_C*.so *.egg-info
