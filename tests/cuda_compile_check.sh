#!/usr/bin/env bash
# Syntax-check the torch bindings of the CUDA kernels with the host compiler. Runs where nvcc exists even if
# torch has no CUDA, so CUDA code cannot rot unseen. Every .cu itself is compiled for sm_90a and sm_80, with
# -Werror all-warnings and -Xptxas -v, by the compile gate (python -m benchmarks.compile, make compile-gate,
# which make test runs after this check).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
PYTHON=${PYTHON:-python3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
# The bindings include torch's c10/cuda headers; a CPU-only torch lacks one generated header of
# macros, which an empty stand-in replaces for a syntax-only check.
torch_inc=$("$PYTHON" -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))")
py_inc=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
cuda_inc=""
for candidate in "${CUDA_HOME:-}/include" "$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")/include" \
    /usr/local/cuda/include; do
  if [ -f "$candidate/cuda_runtime.h" ]; then cuda_inc=$candidate; break; fi
done
if [ -z "$cuda_inc" ]; then echo "cuda-check: cuda_runtime.h not found (set CUDA_HOME)"; exit 1; fi
mkdir -p "$out/shim/c10/cuda/impl"
echo '#pragma once' > "$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
for cpp in csrc/cuda/bindings/*.cpp; do
  if ! g++ -std=c++20 -fsyntax-only -Wall -Werror -DGENFAST_WITH_CUDA=1 -I"$out/shim" $torch_inc -I"$cuda_inc" -I"$py_inc" "$cpp"; then
    echo "cuda-check: FAILED syntax check $cpp"; status=1
  fi
done
[ $status -eq 0 ] && echo "cuda-check: bindings syntax-checked (the compile gate compiles the .cu files)"
exit $status
