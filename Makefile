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
NPROC := $(shell nproc 2>/dev/null || echo 2)
GATE_JOBS ?= $(NPROC)
# pytest-xdist worker processes for the tests (pytest -n; 0: run them in pytest's own process). Where xdist is not
# installed (a preinstalled environment may lack it), the tests run in one process.
TEST_JOBS ?= $(NPROC)
PYTEST_XDIST = $$($(PYTHON) -c "import xdist" >/dev/null 2>&1 && echo "-n $(TEST_JOBS)")
# The compile gate runs under this environment's triton and under triton 3.6.0 (torch 2.11's pin, the GPU
# machine's), which pip installs into its own folder; where 3.6.0 is the environment's own, once is enough.
GATE_TRITON := 3.6.0
GATE_TRITON_DIR := build/triton-$(GATE_TRITON)
CURRENT_TRITON := $(shell $(PYTHON) -c "import triton; print(triton.__version__)" 2>/dev/null)
ifeq ($(CURRENT_TRITON),$(GATE_TRITON))
GATE_TRITON_STAMP :=
GATE_ARGS ?=
else
GATE_TRITON_STAMP := $(GATE_TRITON_DIR)/.installed
GATE_ARGS ?= --triton-path $(GATE_TRITON_DIR)
endif

.PHONY: test test-quick bench build cuda-check compile-gate gpu-check gpu-check-dry lint info clean help

help:
	@echo "make test    build genfast (and its extension), run the compile gate, lint, run the tests"
	@echo "make test-quick  build, then the tests not marked slow (no compile gate, lint or gpu-check-dry)"
	@echo "make compile-gate  compile every Triton config and .cu for sm_90a and sm_80 (no GPU needed); fails on"
	@echo "             compile errors, shared-memory overflow, spills, no or serialized wgmma; benchmarks/results/compile-*"
	@echo "make bench   run the benchmark suite on the device present; results in benchmarks/results/local/"
	@echo "make gpu-check GPU_CHECK_OUT=DIR  on a GPU machine: build for its arch, GPU tests, compute-sanitizer,"
	@echo "             headline benchmarks, all in DIR within 540 s (README: GPU check)"
	@echo "make gpu-check-dry  the same plan on the CPU, packages the lent GPU image lacks hidden (part of make test)"
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

# Where nvcc exists, syntax-check the torch bindings of the CUDA kernels (the .cu files themselves are compiled
# by the compile gate below), so the CUDA code cannot rot unseen on CPU-only machines.
cuda-check: $(ENV_STAMP)
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: no nvcc here, skipped"; else \
	  PYTHON=$(PYTHON) NVCC=$(NVCC) bash tests/cuda_compile_check.sh; fi

$(GATE_TRITON_DIR)/.installed:
	$(PYTHON) -m pip install --quiet --target $(GATE_TRITON_DIR) triton==$(GATE_TRITON) --no-deps
	touch $@

# The compile gate, part of `make test`: every Triton kernel with every config its autotuner can pick, under this
# environment's triton and triton 3.6.0, and every .cu through nvcc, compiled for sm_90a and sm_80; it fails on a
# compile error, shared-memory overflow, a spill, an attention/conv_transpose dot without wgmma or a *_tma_kernel
# without TMA loads, or wgmma that ptxas serialized (C7514/C7515, sm_90a). It writes the four reports
# benchmarks/results/compile-sm{90a,80}-triton{3.9.0,3.6.0}.{json,md}. Measured from an empty cache with
# GATE_JOBS=2 on 2 cores shared with other work (load 4-5): 9.3 min in all (triton 3.9.0: 137 compiles in 230 s;
# triton 3.6.0: 137 in 173 s; nvcc: 6 .cu x 2 archs in 148 s; 13.4 min at load 5-7), within CI's share for it
# (~25 of its 90 minutes beside ~25 of pytest). build/compile-gate/ caches each Triton compile, so a rerun
# redoes only what changed.
compile-gate: $(ENV_STAMP) $(GATE_TRITON_STAMP)
	NVCC=$(NVCC) $(PYTHON) -m benchmarks.compile --jobs $(GATE_JOBS) $(GATE_ARGS)

lint: $(ENV_STAMP)
	@if $(PYTHON) -m ruff --version >/dev/null 2>&1; then $(PYTHON) -m ruff check genfast benchmarks tests; \
	  else echo "lint: ruff not installed here, skipped"; fi

test: build cuda-check compile-gate lint gpu-check-dry
	$(PYTHON) -m pytest tests $(PYTEST_XDIST) --durations=20 $(PYTEST_ARGS)

# For a developer between edits: every test but those marked slow (pyproject.toml's markers); CI runs `make test`.
test-quick: build
	$(PYTHON) -m pytest tests -m "not slow" $(PYTEST_XDIST) $(PYTEST_ARGS)

bench: build
	$(PYTHON) -m benchmarks.run $(BENCH_ARGS)

# The first minutes on a GPU machine (torch preinstalled, no package index): builds for the local arch itself.
# GPU_CHECK_OUT has no default: on a lent machine it is the folder that comes back ($OUT), and a default would
# write where nothing is returned.
gpu-check: $(ENV_STAMP)
	@if [ -z "$(GPU_CHECK_OUT)" ]; then echo "make gpu-check GPU_CHECK_OUT=<folder> (on a lent machine: \$$OUT)"; exit 2; fi
	$(PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_OUT)

# The plan of gpu-check run on the CPU (benchmarks/gpu_check): its test selection collected, its sanitizer workload
# run under the CPU backends, tiny benchmark cases, with every package the lent image lacks hidden; part of make test.
GPU_CHECK_DRY_OUT ?= build/gpu-check-dry
gpu-check-dry: build
	$(PYTHON) -m benchmarks.gpu_check --dry-run $(GPU_CHECK_DRY_OUT)

info: build
	$(PYTHON) -m genfast info

clean:
	rm -rf build genfast/_C*.so *.egg-info
