"""Triton kernels of genfast::filter_logits_triton and genfast::sample_tokens_triton: sort-free and exact.

One program per row. The kept set of a row is ``{i : y_i >= t}`` (plus the min-p test, itself a threshold on
``y_i - y_max``), where ``y = x / temperature``. Top-k and top-p thresholds both have the form ``t* = max{c :
G(c) >= target}`` with ``G(c) = sum of w_j over y_j >= c`` non-increasing: top-k counts (``w = 1``, target k),
top-p sums the fixed-point weights ``w = fixed_weight(y - y_max)`` over the top-k survivors (target
``max(top_p * G(t_k), 1)`` in fp64; the integer arithmetic of csrc/common/sampling.h, shared by every backend
so that near-ties resolve alike). ``_search`` finds ``t*`` exactly on the order-preserving int32 key of the
fp32 values: each pass over the row evaluates G at NP pivots of ``[lo, hi)`` together, plus, per pivot, the
smallest key at or above it and the largest below it, so that the new bracket is cut down to keys of actual
elements; it stops when one key is left (usually 3-6 passes, at most ~8 for 32-bit keys). Pass 1 also sets the
row's value flags (NaN, +inf, all -inf, overflow, knobs out of range: ``SamplingFlag`` of
genfast/kernels/_sampling_flags.py). The last pass writes the filtered row, or draws Gumbel noise for kept tokens
only and takes the argmax.

csrc/cuda/sampling.cu runs the same search; csrc/cpu/sampling.cpp uses selection on the CPU.
"""

import torch
import triton
import triton.language as tl

from genfast.kernels import _philox
from genfast.kernels._sampling_flags import SamplingFlag

# The flag bits as constexpr globals: a jit function reads module globals only when they are tl.constexpr.
_FLAG_NAN = tl.constexpr(int(SamplingFlag.NAN))
_FLAG_POS_INF = tl.constexpr(int(SamplingFlag.POS_INF))
_FLAG_ALL_NEG_INF = tl.constexpr(int(SamplingFlag.ALL_NEG_INF))
_FLAG_OVERFLOW = tl.constexpr(int(SamplingFlag.OVERFLOW))
_FLAG_TEMPERATURE = tl.constexpr(int(SamplingFlag.TEMPERATURE))
_FLAG_TOP_K = tl.constexpr(int(SamplingFlag.TOP_K))
_FLAG_TOP_P = tl.constexpr(int(SamplingFlag.TOP_P))
_FLAG_MIN_P = tl.constexpr(int(SamplingFlag.MIN_P))


@triton.jit
def _key(y):
    """Order-preserving int32 key of fp32 ``y`` (signed compare); -0.0 maps to +0.0's key, as they tie."""
    bits = y.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return tl.where(bits == -2147483648, 0, key)


@triton.jit
def _load_y(row_ptr, offs, vocab, temp):
    mask = offs < vocab
    x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
    # Correctly rounded division: the reference divides, and top-k ties depend on the exact rounding.
    return tl.math.div_rn(x, temp), mask


@triton.jit
def _fixed_weight(d):
    """exp(d) in 2^-38 fixed point, computed in fp64 and truncated; 0 below d = -27 (csrc/common/sampling.h)."""
    w = (tl.exp(d.to(tl.float64)) * 274877906944.0).to(tl.int64)
    return tl.where(d >= -27.0, w, 0)


@triton.jit
def _search(row_ptr, vocab, temp, y_max, lo, hi, floor, target, RELATIVE: tl.constexpr, BLOCK: tl.constexpr,
            NP: tl.constexpr):
    """max{c in element keys of [lo, hi) : G(c) >= target}, or lo if none (lo must be an element key).

    ``RELATIVE``: G sums the fixed-point weights over keys >= floor and the target is
    ``max(target * G(floor), 1)`` (G(floor): the top-k-filtered total, summed again in each pass); else G
    counts. Integer sums: the same in every pass, in every order, on every backend.
    """
    j = tl.arange(0, NP).to(tl.int64)
    while hi - lo > 1:
        piv = (lo + ((hi - lo) * j) // NP).to(tl.int32)  # piv[0] == lo; piv[NP-1] in (lo, hi) when hi-lo >= 2
        g = tl.zeros([NP], dtype=tl.int64)
        total = tl.zeros([], dtype=tl.int64)
        min_above = tl.full([NP], 2147483647, dtype=tl.int32)
        max_below = tl.full([NP], -2147483648, dtype=tl.int32)
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK).to(tl.int64)
            y, mask = _load_y(row_ptr, offs, vocab, temp)
            key = _key(y)
            if RELATIVE:
                w = tl.where(mask & (key >= floor), _fixed_weight(y - y_max), 0)
            else:
                w = tl.where(mask, 1, 0).to(tl.int64)
            ge = key[:, None] >= piv[None, :]
            valid = mask[:, None]
            g += tl.sum(tl.where(ge, w[:, None], 0), axis=0)
            total += tl.sum(w, axis=0)
            min_above = tl.minimum(min_above, tl.min(tl.where(ge & valid, key[:, None], 2147483647), axis=0))
            max_below = tl.maximum(max_below, tl.max(tl.where(valid & ~ge, key[:, None], -2147483648), axis=0))
        goal = target.to(tl.float64)
        if RELATIVE:
            goal = goal * total.to(tl.float64)
        # At least 1: a goal <= 0 (top_p <= 0 with validate=False) would accept keys above every element.
        ok = g.to(tl.float64) >= tl.maximum(goal, 1.0)
        new_lo = tl.max(tl.where(ok, min_above, lo.to(tl.int32)))
        new_hi = tl.min(tl.where(ok, hi, max_below.to(tl.int64) + 1))
        lo = tl.maximum(lo, new_lo.to(tl.int64))
        hi = tl.minimum(hi, new_hi)
    return lo


@triton.jit
def _sampling_kernel(x_ptr, stride_x, temp_ptr, topk_ptr, topp_ptr, minp_ptr, dmin_ptr, out_ptr, flags_ptr,
                     noise_ptr, seed_ptr, seed_stride, offsets_ptr, vocab, SAMPLE: tl.constexpr,
                     HAS_NOISE: tl.constexpr, HAS_OFFSETS: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * stride_x
    temp_in = tl.load(temp_ptr + row)
    greedy = ~(temp_in > 0.0)  # also NaN and negative temperatures (validate=False)
    temp = tl.where(greedy, 1.0, temp_in)
    top_k = tl.load(topk_ptr + row)
    top_p = tl.load(topp_ptr + row)
    d_min = tl.load(dmin_ptr + row)  # smallest fp32 d with double(d) >= log(min_p): see _min_p_bound

    # Pass 1: max (with its lowest index, the greedy token), the smallest key, and the row's value flags.
    y_max = tl.full([], float("-inf"), dtype=tl.float32)
    best = tl.zeros([], dtype=tl.int64)
    key_min = tl.full([], 2147483647, dtype=tl.int32)
    flags = tl.zeros([], dtype=tl.int32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < vocab
        x = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        y = tl.math.div_rn(x, temp)
        is_nan = x != x
        y_clean = tl.where(is_nan, float("-inf"), y)  # NaN never wins the max
        block_max, block_arg = tl.max(y_clean, axis=0, return_indices=True, return_indices_tie_break_left=True)
        best = tl.where(block_max > y_max, start + block_arg.to(tl.int64), best)
        y_max = tl.maximum(y_max, block_max)
        key_min = tl.minimum(key_min, tl.min(tl.where(mask & ~is_nan, _key(y), 2147483647), axis=0))
        overflow = (tl.abs(y) == float("inf")) & (tl.abs(x) != float("inf"))
        flags |= tl.max(is_nan.to(tl.int32), axis=0) * _FLAG_NAN
        flags |= tl.max((x == float("inf")).to(tl.int32), axis=0) * _FLAG_POS_INF
        flags |= tl.max(overflow.to(tl.int32), axis=0) * _FLAG_OVERFLOW
    if y_max == float("-inf"):
        flags |= _FLAG_ALL_NEG_INF
    min_p = tl.load(minp_ptr + row)
    flags |= tl.where((temp_in >= 0.0) & (temp_in != float("inf")), 0, _FLAG_TEMPERATURE)
    flags |= tl.where(top_k < 0, _FLAG_TOP_K, 0)
    flags |= tl.where((top_p > 0.0) & (top_p <= 1.0), 0, _FLAG_TOP_P)
    flags |= tl.where((min_p >= 0.0) & (min_p <= 1.0), 0, _FLAG_MIN_P)
    tl.store(flags_ptr + row, flags)

    lo = key_min.to(tl.int64)
    hi = _key(y_max).to(tl.int64) + 1
    t_key = lo
    if temp_in > 0.0:
        if (top_k > 0) & (top_k < vocab):
            t_key = _search(row_ptr, vocab, temp, y_max, lo, hi, lo, top_k.to(tl.float64), False, BLOCK, NP)
        if top_p < 1.0:
            t_key = _search(row_ptr, vocab, temp, y_max, t_key, hi, t_key, top_p, True, BLOCK, NP)

    # Last pass: the filtered row, or Gumbel-max over kept tokens.
    best_score = tl.full([], float("-inf"), dtype=tl.float32)
    token = best
    # Row b's noise: Philox(seed_b, step_b * V + col), seed_b = seed[b * seed_stride] (stride 0: one seed for the
    # batch), step_b = offsets[b] for per-row seeds, else b. int64 arithmetic, as the C++ and CUDA kernels do.
    seed = tl.zeros([], dtype=tl.uint64)
    if SAMPLE and not HAS_NOISE:
        seed = tl.load(seed_ptr + row * seed_stride).to(tl.uint64)
    step = row
    if HAS_OFFSETS:
        step = tl.load(offsets_ptr + row)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        y, mask = _load_y(row_ptr, offs, vocab, temp)
        keep = tl.where(greedy, offs == best, mask & (_key(y) >= t_key) & ((y - y_max) >= d_min))
        if SAMPLE:
            if (temp_in > 0.0) & (tl.max(keep.to(tl.int32), axis=0) > 0):  # noise only where something is kept
                if HAS_NOISE:
                    u = tl.load(noise_ptr + row * vocab + offs, mask=keep, other=0.5)
                else:
                    u = _philox.uniform(seed, (step * vocab + offs).to(tl.uint64))
                score = tl.where(keep, y - tl.log(-tl.log(u)), float("-inf"))
                block_best, block_arg = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
                token = tl.where(block_best > best_score, start + block_arg.to(tl.int64), token)
                best_score = tl.maximum(best_score, block_best)
        else:
            tl.store(out_ptr + row * vocab + offs, tl.where(keep, y, float("-inf")), mask=mask)
    if SAMPLE:
        tl.store(out_ptr + row, token)


def _min_p_bound(min_p: torch.Tensor) -> torch.Tensor:
    """Per row, the smallest fp32 ``d`` with ``double(d) >= log(min_p)`` (computed in fp64).

    Then ``(y - y_max) >= d`` in fp32 is exactly the reference's fp64 test; NaN min_p disables it and
    min_p > 1 keeps only the max, as in the reference.
    """
    log_min_p = torch.log(min_p.double())
    log_min_p = torch.where(torch.isnan(log_min_p), float("-inf"), log_min_p).clamp(max=0)
    bound = log_min_p.float()
    return torch.where(bound.double() < log_min_p, torch.nextafter(bound, torch.full_like(bound, float("inf"))), bound)


_BLOCK, _NP = 256, 32


def _block_and_warps(device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps) by architecture, as the compile gate measured them (ptxas -v, triton 3.9 and 3.6):
    256 elements on 8 warps spill nothing on sm_90a but 24 B on sm_80 under 3.6, where 512 on 8 warps fit
    (and spill ~600 B on sm_90a under 3.9)."""
    try:
        hopper = torch.cuda.get_device_capability(device)[0] >= 9
    except (AssertionError, RuntimeError, ValueError):  # no CUDA (the interpreter): any choice computes the same
        hopper = True
    return (_BLOCK, 8) if hopper else (2 * _BLOCK, 8)


def _launch(logits, temperature, top_k, top_p, min_p, out, noise, seed, sample, offsets=None):
    """Runs the kernel; returns (out, flags int32 [B])."""
    batch, vocab = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("sampling: logits rows must be contiguous")
    if not 1 <= vocab < 2**24:
        raise ValueError(f"sampling: logits must have between 1 and 2**24 - 1 columns (tokens), got {vocab}")
    if seed is not None and seed.numel() not in (1, batch):
        raise ValueError(f"sample_tokens: seed must hold 1 or {batch} (one per row) values, got {seed.numel()}")
    if offsets is not None and offsets.shape != (batch,):
        raise ValueError(f"sample_tokens: offsets must have shape ({batch},), got {tuple(offsets.shape)}")
    flags = torch.empty((batch,), device=logits.device, dtype=torch.int32)
    d_min = _min_p_bound(min_p)
    block, warps = _block_and_warps(logits.device) if logits.is_cuda else (_BLOCK, 8)
    _sampling_kernel[(batch,)](
        logits, logits.stride(0), temperature, top_k, top_p, min_p, d_min, out, flags,
        noise if noise is not None else out, seed if seed is not None else top_k,
        1 if seed is not None and seed.numel() > 1 else 0, offsets if offsets is not None else top_k, vocab,
        SAMPLE=sample, HAS_NOISE=noise is not None, HAS_OFFSETS=offsets is not None, BLOCK=block, NP=_NP,
        num_warps=warps,
    )
    return out, flags


def filter_logits(logits, temperature, top_k, top_p, min_p) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty(logits.shape, device=logits.device, dtype=torch.float32)
    return _launch(logits, temperature, top_k, top_p, min_p, out, None, None, False)


def sample_tokens(logits, temperature, top_k, top_p, min_p, noise, seed,
                  offsets=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``seed``: 1 int64 value (row b's counter block is b) or one per row; ``offsets`` int64 [B] (row b's counter
    block, with seed) or None. See genfast/ops/sampling.py."""
    if (noise is None) == (seed is None):
        raise ValueError("sample_tokens: pass exactly one of noise and seed")
    if offsets is not None and seed is None:
        raise ValueError("sample_tokens: offsets needs seed")
    out = torch.empty(logits.shape[:1], device=logits.device, dtype=torch.int64)
    if noise is not None:
        noise = noise.float().contiguous()
    seed = seed.contiguous() if seed is not None else None
    offsets = offsets.contiguous() if offsets is not None else None
    return _launch(logits, temperature, top_k, top_p, min_p, out, noise, seed, True, offsets)
