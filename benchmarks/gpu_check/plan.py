"""The plan of `make gpu-check`: what runs in which phase, with how much time; one plan for the GPU run and the dry run.

Phases, each with a hard limit (``PHASE_LIMITS``, 540 s in all: one device call may run 600 s):

1. build: genfast's extension for this GPU's architecture only, with every core.
2. tests: the GPU cases of each family's test files (``-k GPU_TESTS``) with ``GENFAST_AUTOTUNE=0`` (the heuristic
   tile, one compile per specialization instead of one per config), plus one autotuned case per kernel that
   accumulates into a buffer across its launches (``AUTOTUNED``: the autotuner's benchmark runs must not leak into
   the result), plus warm-up runs that compile what the later phases launch (the sanitizer's workload, one per
   family, and the headline benchmarks) into their Triton cache, so that those phases spend their time checking
   and timing. The steps run side by side (ptxas is single-threaded, the lent machine has 16 cores), the warm-ups
   and then the largest steps first, until the phase's deadline.
3. sanitizer: compute-sanitizer memcheck and racecheck side by side, each over every family's workload under
   every backend that serves it on a GPU (workload.py), with a kernel filter naming every genfast kernel.
4. bench: the headline benchmark cases (``benchmarks.run --quick``), alone on the GPU.

How big each test step is: its measured Triton compile count (``compile_counts``: from the latest committed GPU
run, benchmarks/results/gpu/*/gpu-check.json, else the compile gate's sm_90a report for the lent Triton), at
``SECONDS_PER_COMPILE`` each, plus a process's start. That orders the steps and says whether the phase fits.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS_GPU = os.path.join(ROOT, "benchmarks", "results", "gpu")

FAMILIES = ("attention", "attention_varlen", "attention_decode", "conv_transpose", "sampling", "diffusion", "latent",
            "random", "lstm")
# Seconds per phase. Their sum stays <= 540: a device call may run 600 s, and the rest is the margin for the
# summary, the copies back and a slow start.
PHASE_LIMITS = {"build": 120, "tests": 230, "sanitizer": 110, "bench": 80}
# The second, targeted run (--skip-build, the failed families) fits in this many seconds, the phases scaled.
RETRY_TOTAL_S = 180
LENT_TRITON = "3.6.0"
# ptxas and Triton's passes per kernel variant on one core; the compile gate measured 137 variants in 173 s under
# triton 3.6 with 2 jobs on 2 shared cores (Makefile, compile-gate): ~2.5 s each, an upper bound for the lent cores.
SECONDS_PER_COMPILE = 2.5
STARTUP_S = 15  # one pytest process: python, torch, genfast, collection
LENT_CORES = 16  # the lent machine's: how many steps run side by side there
# A test's id names its device: "not cpu" keeps the GPU cases and the device-free ones (argument checks), and drops
# the CPU backends' cases, which `make test` runs on every machine.
GPU_TESTS = "not cpu"


@dataclasses.dataclass(frozen=True)
class Step:
    """One pytest process of the tests phase: ``files`` filtered by ``keyword`` (pytest's -k)."""

    name: str
    family: str
    files: tuple[str, ...]
    keyword: str = GPU_TESTS
    autotune: bool = False  # GENFAST_AUTOTUNE=1: the autotuner benchmarks its configs, as a user's first call does

    def pytest_args(self) -> list[str]:
        return [*self.files, "-k", self.keyword]


# A test's id carries its dtype as torch prints it ("torch.bfloat16") or short ("bf16"); -k matches substrings, and
# "float16" is one of "bfloat16". Every test falls in at least one of these four (one whose id names two dtypes, say
# an fp32 mask beside bf16 inputs, runs twice).
DTYPE_SHARDS = {"fp32": "float32 or fp32", "fp16": "(float16 and not bfloat16) or fp16", "bf16": "bfloat16 or bf16",
                "other": "not float32 and not fp32 and not float16 and not fp16 and not bf16"}


def _by_dtype(name: str, family: str, files: tuple[str, ...]) -> tuple[Step, ...]:
    """A family's large test files as four processes, one per dtype: each compiles its own kernels, side by side."""
    return tuple(Step(f"{name}-{shard}", family, files, f"{GPU_TESTS} and ({expr})")
                 for shard, expr in DTYPE_SHARDS.items())


TEST_STEPS = (
    *_by_dtype("attention", "attention", ("tests/test_attention.py",)),
    *_by_dtype("attention-kernels", "attention", ("tests/test_attention_kernels.py", "tests/test_attention_sm90.py")),
    *_by_dtype("attention_varlen", "attention_varlen", ("tests/test_attention_varlen.py",)),
    *_by_dtype("attention_decode", "attention_decode", ("tests/test_attention_decode.py",)),
    *_by_dtype("conv_transpose", "conv_transpose", ("tests/test_conv_transpose.py", "tests/test_conv_transpose_cuda.py",
                                                    "tests/test_conv_transpose_kernel.py")),
    Step("sampling", "sampling", ("tests/test_sampling.py", "tests/test_sampling_errors.py",
                                  "tests/test_sampling_pivot_search.py", "tests/test_sampling_seeds.py")),
    Step("diffusion", "diffusion", ("tests/test_diffusion.py",)),
    Step("latent", "latent", ("tests/test_latent.py",)),
    Step("random", "random", ("tests/test_random.py",)),
    Step("lstm", "lstm", ("tests/test_lstm.py",)),
)
# One autotuned case per kernel that accumulates into a buffer across launches: the attention dK/dV kernel adds dQ
# into an fp32 buffer with atomics (dense and varlen layouts). A fresh process, so each shape's first backward is
# the one that autotunes, and its gradients are checked against the reference; bf16 alone keeps it to a few keys.
AUTOTUNED = (
    Step("attention-autotuned", "attention", ("tests/test_attention.py",),
         "test_matches_spec and cuda and bfloat16", autotune=True),
    Step("attention_varlen-autotuned", "attention_varlen", ("tests/test_attention_varlen.py",),
         "test_matches_spec and cuda and bfloat16", autotune=True),
)
# The Triton kernels genfast launches, by name: a sanitizer filter catches a kernel by a substring of its name, and
# these share none (a bare "_kernel" would catch torch's own kernels too). The CUDA kernels all live in the C++
# namespace genfast::, which their mangled names carry. The workload reports every Triton kernel it launched, and
# one missing here fails its family (phases.sanitizer_verdicts).
TRITON_KERNELS = (
    "_fwd_kernel", "_fwd_tma_kernel", "_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
    "_decode_split_kernel", "_decode_combine_kernel", "_append_kernel",
    "_conv_transpose_fwd_kernel", "_epilogue_bwd_kernel",
    "_sampling_kernel",
    "_scheduler_step_kernel", "_cfg_combine_kernel",
    "_reparameterize_kernel", "_reparameterize_backward_kernel", "_gaussian_kl_partial_kernel", "_sum_rows_kernel",
    "_gaussian_kl_backward_kernel", "_langevin_step_kernel",
    "_philox_noise_kernel",
    "_lstm_cell_kernel", "_lstm_cell_backward_kernel",
)
CUDA_KERNEL_NAMESPACE = "genfast"
SANITIZER_TOOLS = ("memcheck", "racecheck")
BENCH_FAMILIES = ("attention", "conv_transpose", "sampling", "diffusion", "latent", "random")


def steps(families: list[str] | None = None) -> list[Step]:
    """The test steps (autotuned ones included) of ``families`` (all by default)."""
    chosen = FAMILIES if families is None else families
    return [s for s in TEST_STEPS + AUTOTUNED if s.family in chosen]


def sanitizer_filter() -> list[str]:
    """compute-sanitizer arguments that check genfast's kernels and nothing else."""
    args = []
    for name in (CUDA_KERNEL_NAMESPACE, *TRITON_KERNELS):
        args += ["--kernel-name", f"kns={name}"]
    return args


def phase_limits(total_s: float | None = None, skip_build: bool = False) -> dict[str, float]:
    """PHASE_LIMITS, without the build when it is skipped, scaled down to ``total_s`` when given."""
    limits = {k: float(v) for k, v in PHASE_LIMITS.items() if not (skip_build and k == "build")}
    if total_s is not None and total_s < sum(limits.values()):
        scale = total_s / sum(limits.values())
        limits = {k: v * scale for k, v in limits.items()}
    return limits


def _latest_gpu_summary() -> dict | None:
    paths = sorted(glob.glob(os.path.join(RESULTS_GPU, "*", "gpu-check.json")))
    for path in reversed(paths):
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if data.get("mode") == "gpu":
            return data
    return None


def compile_counts() -> tuple[dict[str, int], str]:
    """Triton compiles per test step, and where the numbers come from: the latest committed GPU run's per-step
    counts (cubins its cache gained), else the compile gate's sm_90a report for the lent Triton (per family, each
    step of a family counted at its family's whole: an over-estimate, never an under-estimate)."""
    gpu = _latest_gpu_summary()
    if gpu:
        counts = {name: r["compiles"] for name, r in gpu.get("tests", {}).items() if isinstance(r.get("compiles"), int)}
        if counts:
            return counts, f"measured: {gpu.get('device')} run of {gpu.get('commit')}"
    path = os.path.join(ROOT, "benchmarks", "results", f"compile-sm90a-triton{LENT_TRITON}.json")
    per_family: dict[str, int] = {}
    try:
        with open(path) as f:
            rows = json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        rows = []
    for row in rows:
        if row.get("compiled") and not str(row.get("kernel", "")).count(":"):  # Triton rows (".cu:" rows are nvcc)
            per_family[row["family"]] = per_family.get(row["family"], 0) + 1
    counts = {s.name: per_family.get(s.family, 0) for s in TEST_STEPS + AUTOTUNED}
    return counts, f"compile gate: {os.path.relpath(path, ROOT)}"


def estimates(chosen: list[Step], counts: dict[str, int]) -> dict[str, float]:
    """Seconds each step should take: a process's start plus its compiles (the GPU time of the cases is small)."""
    return {s.name: STARTUP_S + counts.get(s.name, 0) * SECONDS_PER_COMPILE for s in chosen}


def order(chosen: list[Step], counts: dict[str, int]) -> list[Step]:
    """The steps largest first: the longest pole starts at once (longest-processing-time-first)."""
    est = estimates(chosen, counts)
    return sorted(chosen, key=lambda s: -est[s.name])


def makespan(chosen: list[Step], counts: dict[str, int], slots: int) -> float:
    """The phase's predicted length when the steps run ``slots`` at a time in ``order``."""
    est = estimates(chosen, counts)
    ends = [0.0] * max(1, slots)
    for step in order(chosen, counts):
        i = ends.index(min(ends))
        ends[i] += est[step.name]
    return max(ends)
