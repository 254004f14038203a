"""The compile gate: every GPU kernel of genfast compiled for Hopper (sm_90a) and Ampere (sm_80) without a GPU.

``python -m benchmarks.compile`` (run by ``make test`` through ``make compile-gate``):

- Triton: the launchers in genfast/kernels are called on meta tensors that claim to be on a CUDA device
  (``fake_cuda``), so they take their GPU paths; every kernel launch is captured instead of run (``capture``),
  an autotuned launch is expanded into every config its autotuner keeps after its own pruning, and each is
  compiled with Triton's compiler for the target, specialized exactly as the JIT would (``triton_build``).
- CUDA: every csrc/cuda/*.cu through nvcc with ``-Xptxas -v`` (``cuda_build``).
- ``report``: one row per (kernel, config) with registers, spills, shared memory and the tensor-core
  instructions in the PTX; the checks that fail the gate; benchmarks/results/compile-<arch>-triton<v>.{json,md}.
"""
