"""Triton kernels of genfast::attention_decode_triton (flash-decoding) and genfast::kv_cache_append_triton.

Decode is memory bound: each step reads the whole cache once for a handful of query rows. So:

- one program per (split, batch x kv head, block of query rows) reads its kv head's cache once for *all* the
  query heads of the GQA group and all Nq new tokens (rows ``r = g * Nq + i``, g the head within the group),
  so a kv tile is loaded once, not Hq / Hk times;
- the visible key range of the sequence (``[lo, hi)`` from its length and the resolved window bounds) is cut into
  ``num_splits`` chunks (multiples of BLOCK_N) handled by separate programs, which is what fills the GPU when
  B * Hk is small and the cache long (flash-decoding). Each writes its normalised partial output and its lse
  (base 2, fp32); a combine kernel merges the splits by lse, in split order. ``num_splits`` 0 fills the GPU
  (``choose_splits``, which depends on B); -1 asks for batch invariance (``invariant_splits``: from Nmax alone).
  Nothing else a row computes depends on other rows (tiles come from D, the dtype and the GQA rows), so with a
  fixed split count a row's output is bitwise the same whatever else is in the batch.

Lengths are read on the device and clamped to [0, Nmax], so a bad ``cache_seqlens`` (possible only with
validate=False) can never index outside the cache. Offsets of batch/head are int64, and row/key offsets too
where some element offset of a tensor reaches 2^31 (``IDX64``).

Grids are one flat axis (``decode_grid``): B * Hk passes the 65535 limit of a CUDA grid's axes 1 and 2 with
large batches of GQA heads.

Paged caches (``block_table``, PAGED): every key row of a tile is fetched through the table (its block
``table[b, n >> log2(block_size)]``, offset ``n & (block_size - 1)``), with the tiles, masks and dots of the dense
kernel, so a paged cache gives the dense result bit for bit. Decode clamps an entry into [0, num_blocks); the
append drops a token whose entry is outside it (never a write into another sequence's block).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from genfast.kernels.attention import needs_int64

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

_COMPILED = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
# The interpreter gets small tiles so tiny tests still cross several tiles and splits.
BLOCK_N = 64 if _COMPILED else 16
MAX_BLOCK_M = 64 if _COMPILED else 16
# fp32 inputs run ieee dots on the FMA units, where each thread holds rows of both operands: 16 rows, 8 warps, and
# key tiles of 64 up to d64, of 16 beyond. Measured with ptxas (sm_90a and sm_80, triton 3.9 and 3.6, 1 to 64 rows):
# 16 x 64 spilled 0.3-37 KB at d128 and d256, 32 or 64 rows spill at d64, 16 x 32 at d128 spills 12-948 B on 4
# warps and 12 B on 8, 16 x 16 on 4 warps 12 B; the rule's tiles spill nothing.
FP32_BLOCK_N = {64: 64, 128: 16, 256: 16}


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, F32_DOT: tl.constexpr):
    # F32_DOT: the interpreter's bf16 dot is wrong (triton 3.9); upcast the already-rounded operands there.
    if F32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _key_rows(Table, b, stb, stj, offs_n, n_ok, num_blocks, PAGE_SHIFT: tl.constexpr):
    """Paged: the block holding each logical key of offs_n (int64, clamped into the pool) and the key's slot in it."""
    page = tl.load(Table + b * stb + (offs_n >> PAGE_SHIFT) * stj, mask=n_ok, other=0).to(tl.int64)
    page = tl.minimum(tl.maximum(page, 0), num_blocks - 1)
    return page, offs_n & ((1 << PAGE_SHIFT) - 1)


@triton.jit
def _decode_split_kernel(Q, K, V, Seqlens, Opart, Lpart, Table,
                         sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, stb, stj,
                         Hk, Nq, Nmax, D, group, rows, num_splits, row_blocks, qk_scale, left, right, num_blocks,
                         PRECISION: tl.constexpr, F32_DOT: tl.constexpr, IDX64: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr,
                         PAGE_SHIFT: tl.constexpr):
    # One flat grid axis: split fastest, then the row block, then batch x kv head.
    pid = tl.program_id(0).to(tl.int64)
    split = pid % num_splits
    pid_r = (pid // num_splits) % row_blocks
    bhk = pid // (num_splits * row_blocks)
    b = bhk // Hk
    hk = bhk % Hk
    length = tl.load(Seqlens + b).to(tl.int64)
    length = tl.minimum(tl.maximum(length, 0), Nmax)

    offs_r = (pid_r * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int32)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = tl.arange(0, BLOCK_N)
    if IDX64:
        offs_j = offs_j.to(tl.int64)
    r_ok = offs_r < rows
    d_ok = offs_d < D
    g = offs_r // Nq
    i = offs_r % Nq
    if IDX64:
        i = i.to(tl.int64)
    h = hk * group + g
    q = tl.load(Q + b * sqb + h[:, None] * sqh + i[:, None] * sqm + offs_d[None, :] * sqd,
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    # New token i sits at position length - Nq + i (the last Nq entries of the sequence's cache prefix).
    pos = length - Nq + i
    # Keys any row may see: [max(0, first pos - left), min(length, last pos + right + 1)).
    lo = tl.maximum(length - Nq - left, 0)
    hi = tl.minimum(length, length + right)
    span = tl.maximum(hi - lo, 0)
    chunk = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, hi)

    # Paged: the head's rows of block 0; each key adds its block's offset.
    k_base = K + hk * skh
    v_base = V + hk * svh
    if not PAGED:
        k_base += b * skb
        v_base += b * svb
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_j
        n_ok = offs_n < end
        if PAGED:
            page, slot = _key_rows(Table, b, stb, stj, offs_n, n_ok, num_blocks, PAGE_SHIFT)
            k_row = page * skb + slot * skn
            v_row = page * svb + slot * svn
        else:
            k_row = offs_n * skn
            v_row = offs_n * svn
        kt = tl.load(k_base + k_row[None, :] + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_base + v_row[:, None] + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = _mm(q, kt, PRECISION, F32_DOT) * qk_scale
        ok = n_ok[None, :] & (offs_n[None, :] >= pos[:, None] - left) & (offs_n[None, :] <= pos[:, None] + right)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only -inf so far keeps a finite shift, so exp2 gives 0 rather than NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION, F32_DOT)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    part = (bhk * num_splits + split) * rows + offs_r
    tl.store(Opart + part[:, None] * D + offs_d[None, :], acc / l_safe[:, None], mask=r_ok[:, None] & d_ok[None, :])
    tl.store(Lpart + part, tl.where(empty, float("-inf"), m_i + tl.log2(l_safe)), mask=r_ok)


@triton.jit
def _decode_combine_kernel(Opart, Lpart, Out, Lse, D, rows, num_splits, row_blocks,
                           BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """out = sum_s 2^(lse_s - lse) o_s with lse = log2 sum_s 2^lse_s; rows of [B, Hq, Nq] are (bhk, r)."""
    pid = tl.program_id(0).to(tl.int64)
    bhk = pid // row_blocks
    offs_r = (pid % row_blocks).to(tl.int32) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    r_ok = offs_r < rows
    ok = r_ok[:, None] & (offs_d[None, :] < D)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(Lpart + (bhk * num_splits + s) * rows + offs_r, mask=r_ok, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for s in range(num_splits):
        part = (bhk * num_splits + s) * rows + offs_r
        w = tl.exp2(tl.load(Lpart + part, mask=r_ok, other=float("-inf")) - m_use)
        total += w
        acc += w[:, None] * tl.load(Opart + part[:, None] * D + offs_d[None, :], mask=ok, other=0.0)
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)[:, None]
    # [B, Hq, Nq, D] contiguous: row (b, hk * group + g, i) is bhk * rows + r, since r = g * Nq + i.
    tl.store(Out + (bhk * rows + offs_r)[:, None] * D + offs_d[None, :], out.to(Out.dtype.element_ty), mask=ok)
    lse = tl.where(empty, float("-inf"), (m_use + tl.log2(tl.where(empty, 1.0, total))) * 0.6931471805599453)
    tl.store(Lse + bhk * rows + offs_r, lse, mask=r_ok)


@triton.jit
def _append_kernel(Cache, New, Seqlens, Table, scb, sch, scn, scd, snb, snh, snn, snd, stb, stj, Hk, Nnew, Nmax, D,
                   t_blocks, num_blocks, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PAGED: tl.constexpr,
                   PAGE_SHIFT: tl.constexpr):
    """cache[b, h, L_b + t] = new[b, h, t]; positions past Nmax (only with validate=False) are dropped. Paged: the
    logical slot's block and offset; a block entry outside [0, num_blocks) drops the token."""
    pid = tl.program_id(0).to(tl.int64)
    bh = pid // t_blocks
    b = bh // Hk
    h = bh % Hk
    offs_t = (pid % t_blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    length = tl.load(Seqlens + b).to(tl.int64)
    dest = length + offs_t
    t_ok = (offs_t < Nnew) & (dest >= 0) & (dest < Nmax)
    if PAGED:
        row = tl.load(Table + b * stb + (dest >> PAGE_SHIFT) * stj, mask=t_ok, other=-1).to(tl.int64)
        t_ok = t_ok & (row >= 0) & (row < num_blocks)
        dest = dest & ((1 << PAGE_SHIFT) - 1)
    else:
        row = tl.zeros_like(dest) + b
    ok = t_ok[:, None] & (offs_d[None, :] < D)
    x = tl.load(New + b * snb + h * snh + offs_t[:, None] * snn + offs_d[None, :] * snd, mask=ok)
    tl.store(Cache + row[:, None] * scb + h * sch + dest[:, None] * scn + offs_d[None, :] * scd, x, mask=ok)


# ------------------------------------------------------------------------------------------ launchers
def _shared_limit(device: torch.device) -> int:
    """Shared memory one block may opt in to on ``device`` (227 KB on Hopper, 163 KB on A100)."""
    try:
        return int(torch.cuda.get_device_properties(device).shared_memory_per_block_optin)
    except (AttributeError, RuntimeError, AssertionError):
        return 99 * 1024  # the smallest of the recent GPUs (sm_86/89/120)


def split_shared_bytes(block_m: int, block_n: int, block_d: int, num_stages: int, elem: int) -> int:
    """Shared memory of the split kernel, an upper bound: the K and V tiles of the stages in flight (one fewer
    than num_stages) plus three [BLOCK_M, BLOCK_D] tiles for Q and the layout changes of the dots (bf16 d256,
    64 rows: 229,376 B measured with 3 stages, 163,840 B with 2; fewer rows need less)."""
    return (num_stages - 1) * 2 * block_n * block_d * elem + 3 * block_m * block_d * elem


def split_tiles(rows: int, block_d: int, elem: int, shared_limit: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the split kernel for ``rows`` query rows per kv head
    (group x Nq), head dim ``block_d`` (padded) and ``elem`` bytes per element: a rule, measured with ptxas on
    sm_90a and sm_80 under triton 3.9 and 3.6 (bf16/fp32, d64/128/256, 1/32/64 rows), so nothing spills or
    overflows shared memory, with no benchmarking. The interpreter takes small fixed tiles (16 x 16)."""
    if not _COMPILED:
        return max(16, min(MAX_BLOCK_M, triton.next_power_of_2(rows))), BLOCK_N, 4, 1
    if elem >= 4:
        block_m = 16
        block_n = FP32_BLOCK_N[max(64, block_d)]
        num_warps = 8
    else:
        block_m = max(16, min(MAX_BLOCK_M, triton.next_power_of_2(rows)))
        block_n = BLOCK_N
        # 4 warps spill 8-340 B from 32 rows on (d128/d256; 64 rows at d64 on sm_80); 8 warps spill nothing.
        num_warps = 4 if block_m == 16 else 8
    # A third stage keeps two K/V tiles in flight (memory-bound: worth it) where shared memory allows.
    num_stages = 3 if split_shared_bytes(block_m, block_n, block_d, 3, elem) <= shared_limit else 2
    return block_m, block_n, num_warps, num_stages


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: any small number; tests pass num_splits explicitly too


def choose_splits(batch: int, kv_heads: int, row_blocks: int, nmax: int, device: torch.device,
                  block_n: int = BLOCK_N) -> int:
    """Splits per (batch, kv head): enough programs for ~2 waves on the GPU, each split >= 4 key tiles.

    Decided from Nmax (the cache capacity), not the true lengths, so no host synchronisation is needed;
    shorter sequences simply get shorter chunks.
    """
    programs = batch * kv_heads * row_blocks
    want = triton.cdiv(2 * _sm_count(device), programs)
    useful = triton.cdiv(nmax, 4 * block_n)
    return max(1, min(want, useful, 128))


# Batch-invariant splits: one per this many keys of the cache's capacity (the interpreter's small tiles get small
# splits too, so tiny tests cross several), at most MAX_SPLITS.
INVARIANT_KEYS_PER_SPLIT = 256 if _COMPILED else 4 * BLOCK_N
MAX_SPLITS = 128


def invariant_splits(nmax: int) -> int:
    """Splits per (batch, kv head) for batch invariance: a function of the cache capacity Nmax alone (the tiles are
    already fixed by D, the dtype and the GQA rows), never of B or of the device, so a row's merge order, hence its
    output bit for bit, does not depend on the rest of the batch; no host synchronisation (CUDA graphs work)."""
    return max(1, min(triton.cdiv(nmax, INVARIANT_KEYS_PER_SPLIT), MAX_SPLITS))


def decode_grid(batch: int, kv_heads: int, row_blocks: int, num_splits: int) -> tuple[int]:
    """The split kernel's grid: one flat axis of B * Hk * row blocks * splits programs (axis 0 allows 2^31 - 1;
    axes 1 and 2 only 65535, which B * Hk alone passes)."""
    return (batch * kv_heads * row_blocks * num_splits,)


def _paging(block_table, cache):
    """(table or a placeholder, its two strides, number of blocks, log2 block size, logical capacity) for the
    kernels; a dense cache gives PAGE_SHIFT 0 and its own Nmax."""
    if block_table is None:
        return cache, 0, 0, cache.shape[0], 0, cache.shape[2]
    page = cache.shape[2]
    return (block_table, block_table.stride(0), block_table.stride(1), cache.shape[0], page.bit_length() - 1,
            block_table.shape[1] * page)


def attention_decode(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left, window_right, num_splits,
                     block_table=None):
    b, hq, nq, d = q.shape
    hk = k_cache.shape[1]
    table, stb, stj, num_blocks, page_shift, nmax = _paging(block_table, k_cache)
    group = hq // hk
    rows = group * nq
    block_d = max(16, triton.next_power_of_2(d))
    block_m, block_n, num_warps, num_stages = split_tiles(rows, block_d, q.element_size(), _shared_limit(q.device))
    row_blocks = triton.cdiv(rows, block_m)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if num_splits < 0:  # batch invariance asked for
        num_splits = invariant_splits(nmax)
    elif num_splits == 0:
        num_splits = choose_splits(b, hk, row_blocks, nmax, q.device, block_n)
    # The bounds come resolved by genfast.ops._attention_common.window_bounds (causal folded in as right = 0).
    left, right = window_left, window_right
    if left < 0 or right < 0 or (causal and right != 0):
        raise ValueError(f"attention_decode kernels: window bounds must be resolved (>= 0, right = 0 when causal), "
                         f"got ({left}, {right}), causal={causal}")
    opart = torch.empty(b * hk * num_splits * rows, d, dtype=torch.float32, device=q.device)
    lpart = torch.empty(b * hk * num_splits * rows, dtype=torch.float32, device=q.device)
    _decode_split_kernel[decode_grid(b, hk, row_blocks, num_splits)](
        q, k_cache, v_cache, cache_seqlens, opart, lpart, table, *q.stride(), *k_cache.stride(), *v_cache.stride(),
        stb, stj, hk, nq, nmax, d, group, rows, num_splits, row_blocks, scale * LOG2E, left, right, num_blocks,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        F32_DOT=q.dtype == torch.bfloat16 and q.device.type == "cpu",
        IDX64=needs_int64(q, k_cache, v_cache),
        BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, PAGED=block_table is not None, PAGE_SHIFT=page_shift,
        num_warps=num_warps, num_stages=num_stages,
    )
    _decode_combine_kernel[(b * hk * row_blocks,)](opart, lpart, out, lse, d, rows, num_splits, row_blocks,
                                                   BLOCK_D=block_d, BLOCK_M=block_m)
    return out, lse


def kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table=None) -> None:
    b, hk, _, d = k_new.shape
    table, stb, stj, num_blocks, page_shift, nmax = _paging(block_table, k_cache)
    nnew = k_new.shape[2]
    if k_new.numel() == 0:
        return
    block_t = min(64, max(1, triton.next_power_of_2(nnew)))
    block_d = triton.next_power_of_2(d)
    t_blocks = triton.cdiv(nnew, block_t)
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        _append_kernel[(b * hk * t_blocks,)](
            cache, new, cache_seqlens, table, *cache.stride(), *new.stride(), stb, stj, hk, nnew, nmax, d, t_blocks,
            num_blocks, BLOCK_T=block_t, BLOCK_D=block_d, PAGED=block_table is not None, PAGE_SHIFT=page_shift,
        )


__all__ = ["attention_decode", "kv_cache_append", "choose_splits", "invariant_splits", "decode_grid", "split_tiles"]
