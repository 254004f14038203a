"""The benchmark harness shared by every benchmarks/bench_<family>.py.

A bench module exposes ``cases(device) -> list[BenchCase]``: one entry per (op, case, provider), and may expose
``replaced(device) -> list[ReplacedCase]``: the drop-in comparisons (see ``ReplacedCase``).
``benchmarks/run.py`` times them all in one run and writes the result files; the same cases run
under pytest-benchmark through ``benchmarks/test_benchmarks.py``. Ratios are only ever derived from
rows of the same run (CONTRIBUTING.md, section 4).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable

import torch

import genfast
from genfast import _backend

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass
class BenchCase:
    """``setup()`` allocates the inputs and returns the zero-argument callable that is timed.

    ``flops`` and ``bytes`` describe the work of one call (standard counts, not what a provider
    happens to do), so every provider of a case is measured against the same yardstick.
    """

    family: str
    op: str
    case: str
    provider: str
    setup: Callable[[], Callable[[], Any]]
    flops: float | None = None
    bytes: float | None = None

    @property
    def name(self) -> str:
        return f"{self.op}[{self.case}]-{self.provider}"


REPLACED_REPS = 21  # at least 20 alternating repetitions (issue 26); odd, so the median is one measured pair


@dataclasses.dataclass
class ReplacedCase:
    """A "replaced" row: genfast's default call against exactly what a user had before the swap.

    How to add rows (any bench module): define ``replaced(device, quick=False) -> list[ReplacedCase]`` beside
    ``cases``; ``benchmarks/run.py`` collects it from every bench module (``--replaced`` runs only these rows,
    in a few minutes) and ``benchmarks/report.py`` prints them as their own table, flagging every row whose
    median ratio is below ``1 - report.LOSS_MARGIN`` (0.97x) as a loss.

    - ``drop_in``: what the user swaps in, as they would write it (``genfast.ops.attention``,
      ``attn_implementation="genfast"``); ``before``: what it replaces, as they had it
      (``F.scaled_dot_product_attention``, ``transformers generate``).
    - ``setup()`` allocates everything once (inputs, models; not timed) and returns ``(genfast_call,
      before_call)``: two zero-argument callables doing the same work, each genfast's or the user's default
      call (no backend forced, no fast option the user would not know of). A backward row times forward and
      backward in each callable.
    - ``measure_replaced`` alternates the two every repetition (which one goes first alternates too), at least
      ``REPLACED_REPS`` times, and reports the median of the per-repetition ratios ``before / genfast``, so
      that a noisy machine hits both providers alike.
    """

    family: str
    drop_in: str
    case: str
    before: str
    setup: Callable[[], tuple[Callable[[], Any], Callable[[], Any]]]

    @property
    def name(self) -> str:
        return f"{self.drop_in}[{self.case}] vs {self.before}"


def _timed_sample(fn: Callable[[], Any], device: torch.device, inner: int) -> float:
    synchronize(device)
    begin = time.perf_counter()
    for _ in range(inner):
        fn()
    synchronize(device)
    return (time.perf_counter() - begin) * 1e3 / inner


def measure_replaced(case: ReplacedCase, device: torch.device, *, reps: int = REPLACED_REPS, warmup: int = 3,
                     min_sample_ms: float = 2.0) -> dict:
    """Time ``case``'s two callables alternately; the row of the results file's ``"replaced"`` list.

    A sample is ``inner`` back-to-back calls (the same count for both providers), enough that the shorter of the
    two lasts ``min_sample_ms``: sub-millisecond calls are otherwise below what perf_counter and the scheduler
    resolve. ``ratio`` is the median over repetitions of ``before ms / genfast ms`` (above 1: genfast faster).
    """
    ours, theirs = case.setup()
    for _ in range(warmup):
        ours()
        theirs()
    shortest = min(_timed_sample(ours, device, 1), _timed_sample(theirs, device, 1))
    inner = max(1, min(1000, int(min_sample_ms / max(shortest, 1e-6)) + 1))
    mine, peer, ratios = [], [], []
    for rep in range(max(reps, REPLACED_REPS)):
        if rep % 2 == 0:
            a = _timed_sample(ours, device, inner)
            b = _timed_sample(theirs, device, inner)
        else:
            b = _timed_sample(theirs, device, inner)
            a = _timed_sample(ours, device, inner)
        mine.append(a)
        peer.append(b)
        ratios.append(b / a)
    ordered = sorted(ratios)
    return {
        "family": case.family, "drop_in": case.drop_in, "case": case.case, "before": case.before,
        "genfast_ms": round(statistics.median(mine), 5), "before_ms": round(statistics.median(peer), 5),
        "ratio": round(statistics.median(ratios), 4), "ratio_p20": round(ordered[int(0.2 * len(ordered))], 4),
        "ratio_p80": round(ordered[min(len(ordered) - 1, int(0.8 * len(ordered)))], 4),
        "reps": len(ratios), "calls_per_sample": inner,
    }


def genfast_providers(op: str, device: torch.device) -> list[str]:
    """The genfast backends that can serve ``op`` on ``device`` (Triton only when compiled)."""
    dispatch = _backend.DISPATCHERS[op]
    names = []
    for name in ("cuda", "triton", "cpu"):
        if name == "triton" and device.type == "cpu":
            continue  # the interpreter is a correctness tool, not a benchmark subject
        if dispatch.why_not(name, device) is None:
            names.append(name)
    return names


def with_backend(name: str, fn):
    def run():
        with genfast.backend(name):
            return fn()

    return run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, *, min_time_s: float = 0.2, warmup: int = 3,
              max_reps: int = 1000) -> list[float]:
    """Milliseconds per call, one sample per repetition: CUDA events on a GPU, perf_counter on a CPU.

    On a GPU the L2 cache is flushed before each repetition, so memory-bound ops are not flattered
    by inputs left in cache by the previous repetition.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    # Estimate one call to choose the number of repetitions.
    start = time.perf_counter()
    fn()
    synchronize(device)
    estimate = max(time.perf_counter() - start, 1e-6)
    reps = int(min(max_reps, max(5, min_time_s / estimate)))
    samples = []
    if device.type == "cuda":
        flush = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)
        for _ in range(reps):
            flush.zero_()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
    else:
        for _ in range(reps):
            begin = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - begin) * 1e3)
    return samples


def quantiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"ms": statistics.median(ordered), "ms_p20": pick(0.2), "ms_p80": pick(0.8)}


def measure(case: BenchCase, device: torch.device, **timing) -> dict:
    fn = case.setup()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples = time_call(fn, device, **timing)
    q = quantiles(samples)
    seconds = q["ms"] / 1e3
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "family": case.family, "op": case.op, "case": case.case, "provider": case.provider,
        "ms": round(q["ms"], 5), "ms_p20": round(q["ms_p20"], 5), "ms_p80": round(q["ms_p80"], 5),
        "TFLOPs": round(case.flops / seconds / 1e12, 3) if case.flops else None,
        "GBps": round(case.bytes / seconds / 1e9, 2) if case.bytes else None,
        "peak_mem_MB": round(peak, 1) if peak is not None else None,
    }


def ceilings(device: torch.device) -> dict[str, float]:
    """Bandwidth and compute ceilings measured in this run: a large copy and a large matmul."""
    numel = (1 << 28) // 4 if device.type == "cuda" else (1 << 26) // 4  # 256 MiB on GPU, 64 MiB on CPU
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_ms = statistics.median(time_call(lambda: dst.copy_(src), device, min_time_s=0.3))
    result = {"copy_GBps": round(2 * src.numel() * 4 / (copy_ms / 1e3) / 1e9, 1)}
    if device.type == "cuda":
        n = 8192
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        mm_ms = statistics.median(time_call(lambda: a @ b, device, min_time_s=0.3))
        result["bf16_matmul_TFLOPs"] = round(2 * n**3 / (mm_ms / 1e3) / 1e12, 1)
    else:
        n = 1024
        a, b = torch.randn(n, n), torch.randn(n, n)
        mm_ms = statistics.median(time_call(lambda: a @ b, device, min_time_s=0.3))
        result["fp32_matmul_TFLOPs"] = round(2 * n**3 / (mm_ms / 1e3) / 1e12, 3)
    return result


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                             cwd=os.path.dirname(RESULTS_DIR))
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    commit = _git("rev-parse", "--short", "HEAD") or "nocommit"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += "-dirty"
    return {
        "device": name, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }

