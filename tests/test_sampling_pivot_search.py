"""The top-k/top-p threshold search, checked where no GPU is needed.

``cluster_search`` below is a line-by-line NumPy mirror of the CUDA kernel's atomics-free pivot search
(csrc/cuda/sampling.cu): a row cut into ``splits`` chunks (one CTA each, 16-byte aligned), ``PIVOTS`` pivots per
pass, per pivot the integer weight sum G, the smallest key at or above it and the largest below it, combined over
the chunks, then the bracket update. It must find the same kept set as the C++ CPU kernel, which finds the
threshold by selection instead: the two share only the integer arithmetic (fixed_weight, top_p_target of
csrc/common/sampling.h). The near-tie tests check that the backends runnable here (C++ and the Triton
interpreter) resolve a top-p boundary one fixed-point unit away alike.
"""

import math

import numpy as np
import pytest
import torch

import genfast
from genfast.ops import filter_logits
from tests.conftest import backend_params

PIVOTS = 8  # kPivots in sampling.cu
INT32_MAX, INT32_MIN = 2**31 - 1, -(2**31)
FIXED_ONE = 2.0**38


def float_key(y: np.ndarray) -> np.ndarray:
    bits = y.astype(np.float32).view(np.int32).astype(np.int64)
    key = np.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return np.where(bits == INT32_MIN, 0, key)


def fixed_weight(d: np.ndarray) -> np.ndarray:
    w = np.trunc(np.exp(d.astype(np.float64)) * FIXED_ONE).astype(np.int64)
    return np.where(d >= np.float32(-27.0), w, 0)


def top_p_target(top_p: float, z: int) -> float:
    return max(float(np.float32(top_p)) * float(z), 1.0)


def chunks(vocab: int, splits: int, width: int = 4) -> list[range]:
    per_chunk = -(-(-(-vocab // splits)) // width) * width  # ceil(ceil(V / splits) / width) * width
    return [range(min(vocab, r * per_chunk), min(vocab, r * per_chunk + per_chunk)) for r in range(splits)]


def cluster_search(y, lo, hi, fraction, relative, splits, y_max):
    """sampling.cu's cluster_search; returns (threshold key, passes)."""
    keys = float_key(y)
    weights = fixed_weight((y - y_max).astype(np.float32)) if relative else np.ones(len(y), dtype=np.int64)
    target, first, passes = (0.0 if relative else float(fraction)), True, 0
    while hi - lo > 1:
        pivot = [lo + ((hi - lo) * j) // PIVOTS for j in range(PIVOTS)]
        g = [0] * PIVOTS
        above_min, below_max = [INT32_MAX] * PIVOTS, [INT32_MIN] * PIVOTS
        for part in chunks(len(y), splits):  # one CTA each; integer sums, min and max combine in any order
            k, w = keys[part.start:part.stop], weights[part.start:part.stop]
            inside = k >= pivot[0]
            for j in range(PIVOTS):
                ge = inside & (k >= pivot[j])
                g[j] += int(w[ge].sum())
                if ge.any():
                    above_min[j] = min(above_min[j], int(k[ge].min()))
                if (inside & ~ge).any():
                    below_max[j] = max(below_max[j], int(k[inside & ~ge].max()))
        if first and relative:
            target = top_p_target(fraction, g[0])
        first = False
        new_lo, new_hi = lo, hi
        for j in range(PIVOTS):
            if float(g[j]) >= max(target, 1.0):
                new_lo = max(new_lo, above_min[j])
            else:
                new_hi = min(new_hi, below_max[j] + 1)
        lo, hi, passes = new_lo, new_hi, passes + 1
    return lo, passes


def kept_by_cuda_algorithm(y: np.ndarray, top_k: int, top_p: float, splits: int):
    y_max = np.float32(y.max())
    threshold = int(float_key(y).min())
    hi = int(float_key(np.array([y_max]))[0]) + 1
    passes = []
    if 0 < top_k < len(y):
        threshold, n = cluster_search(y, threshold, hi, top_k, False, splits, y_max)
        passes.append(n)
    if top_p < 1.0:
        threshold, n = cluster_search(y, threshold, hi, top_p, True, splits, y_max)
        passes.append(n)
    return float_key(y) >= threshold, passes


def _row(vocab: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(1, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    if vocab > 20:
        x[:, 3:9] = x[:, 2:3]  # ties
        x[:, 11] = float("-inf")
    return x.to(dtype)


@pytest.mark.parametrize("vocab", [1, 17, 97, 1000])
@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (50, 1.0), (5, 0.5), (40, 0.95), (999, 0.999), (0, 0.3)])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_cuda_pivot_search_mirror_matches_the_cpu_kernel(vocab, top_k, top_p, splits):
    pytest.importorskip("genfast._C")
    for seed, dtype in [(0, torch.float32), (1, torch.bfloat16)]:
        x = _row(vocab, seed, dtype)
        with genfast.backend("cpu"):
            kept = ~torch.isinf(filter_logits(x, top_k=top_k, top_p=top_p))[0].numpy()
        mirror, passes = kept_by_cuda_algorithm(x.float()[0].numpy(), top_k, top_p, splits)
        assert np.array_equal(mirror, kept), (seed, dtype)
        # 8 pivots cut a 2^32 bracket at least 9-fold per pass; the data-driven cuts usually do far better.
        assert all(n <= math.ceil(32 / math.log2(PIVOTS + 1)) for n in passes), passes


def _near_tie_cases():
    """(row, top_p) pairs where the fixed-point mass above some token is one unit from top_p * Z."""
    x = _row(1000, 7)[0]
    y = x.numpy().astype(np.float32)
    w = fixed_weight((y - y.max()).astype(np.float32))
    z = int(w.sum())
    order = np.argsort(-y, kind="stable")
    above = np.cumsum(w[order])  # the mass of the first n tokens in descending order
    cases = []
    for n in (3, 20, 60, 200):
        p = np.float32(above[n - 1] / z)
        for q in (np.nextafter(p, np.float32(0)), p, np.nextafter(p, np.float32(1))):
            cases.append((x, float(q)))
    return cases


@pytest.mark.parametrize("device,backend", backend_params("filter_logits"))
def test_near_ties_resolve_alike_on_every_backend(device, backend):
    for x, top_p in _near_tie_cases():
        y = x.numpy()
        with genfast.backend(backend):
            kept = ~torch.isinf(filter_logits(x[None].to(device), top_p=top_p))[0].cpu().numpy()
        mirror, _ = kept_by_cuda_algorithm(y, 0, top_p, splits=4)
        assert np.array_equal(kept, mirror), top_p


def test_near_tie_cases_are_near_ties():
    # The cases sit where an fp32 running sum could land on either side: within a few fp32 ulps of top_p * Z,
    # and the three top_p of each triple straddle the boundary (the kept count changes inside the triple).
    cases = _near_tie_cases()
    for x, top_p in cases:
        y = x.numpy()
        w = fixed_weight((y - y.max()).astype(np.float32))
        z = int(w.sum())
        above = np.cumsum(w[np.argsort(-y, kind="stable")])
        gap = np.min(np.abs(above - top_p * z)) / z
        assert gap < 4 * float(np.finfo(np.float32).eps)
    for i in range(0, len(cases), 3):
        counts = {int(kept_by_cuda_algorithm(x.numpy(), 0, p, 1)[0].sum()) for x, p in cases[i:i + 3]}
        assert len(counts) == 2, counts
