"""The jit helpers the attention kernels share (genfast/kernels/attention.py, attention_sm90.py), and where they
apply the window rule: a query at key position ``p = i + shift`` (bottom-right alignment, shift = Nk - Nq) sees
keys ``p - left <= j <= p + right``, with ``left``/``right`` the bounds genfast.ops._attention_common.window_bounds
resolved (``masked_scores`` in a tile, ``key_runs`` for a block of queries, ``query_range`` for a tile of keys).
"""

from __future__ import annotations

import triton
import triton.language as tl

from genfast.kernels import _philox

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2  # MASK_KIND: the kernels compare it with the literals


@triton.jit
def mm(a, b, PRECISION: tl.constexpr, F32_DOT: tl.constexpr):
    """tl.dot with fp32 accumulation. ``F32_DOT``: upcast the (already rounded) operands first; only set under
    the interpreter, whose bf16 dot is wrong (triton 3.9), so the rounding the GPU sees is kept."""
    if F32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def tile_scores(q, kt, offs_m, offs_n, mask_ptr, smm, smn, Nq, Nk, end_n, shift, left, right, qk_scale, mask_scale,
            MASK_KIND: tl.constexpr, POSITION: tl.constexpr, PRECISION: tl.constexpr, F32_DOT: tl.constexpr):
    """Scores of a [BLOCK_M, BLOCK_N] tile: q @ k^T * qk_scale + mask * mask_scale, -inf where masked.

    The forward works in base 2 (qk_scale = scale * log2(e), mask_scale = log2(e)); the backward in natural
    units (see _bwd_dq_kernel).

    ``POSITION``: apply the bounds (j < end_n) and the causal/window limits; off for the tiles every row sees.
    """
    return masked_scores(mm(q, kt, PRECISION, F32_DOT) * qk_scale, offs_m, offs_n, mask_ptr, smm, smn, Nq, Nk, end_n,
                   shift, left, right, mask_scale, MASK_KIND, POSITION)


@triton.jit
def masked_scores(s, offs_m, offs_n, mask_ptr, smm, smn, Nq, Nk, end_n, shift, left, right, mask_scale,
            MASK_KIND: tl.constexpr, POSITION: tl.constexpr):
    """The scaled scores ``s`` of a tile with the attention mask and the position limits applied (see tile_scores)."""
    if MASK_KIND != 0:
        in_bounds = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
        m = tl.load(mask_ptr + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=in_bounds, other=0)
        if MASK_KIND == 1:
            s = tl.where(m != 0, s, float("-inf"))
        else:
            s = s + m.to(tl.float32) * mask_scale
    if POSITION:
        pos = offs_m[:, None] + shift
        ok = (offs_n[None, :] < end_n) & (offs_n[None, :] >= pos - left) & (offs_n[None, :] <= pos + right)
        s = tl.where(ok, s, float("-inf"))
    return s


@triton.jit
def dropout_keep(seed, row0, offs_m, offs_n, Nk, dropout_p):
    """The dropout keep mask of a [BLOCK_M, BLOCK_N] tile: Philox counter (row0 + i) * Nk + j.

    row0 + i is the row's flat index in lse: (b * Hq + h) * Nq + i, or h * total_q + cu_seqlens_q[b] + i in the
    varlen layout, where Nk is max_seqlen_k.
    """
    counter = (row0 + offs_m[:, None].to(tl.int64)) * Nk + offs_n[None, :].to(tl.int64)
    return _philox.uniform(seed, counter.to(tl.uint64)) >= dropout_p


@triton.jit
def sequence_extent(Cu, b, N, Total, VARLEN: tl.constexpr):
    """(first row, length) of sequence b: packed rows [cu[b], cu[b + 1]) with the bounds clamped into [0, Total],
    so that no cu_seqlens values (even unchecked ones) make a program read or write outside the tensors; or
    (0, N) for the padded layout."""
    if VARLEN:
        start = tl.minimum(tl.maximum(tl.load(Cu + b), 0), Total)
        end = tl.minimum(tl.maximum(tl.load(Cu + b + 1), start), Total)
        length = end - start
        start = start.to(tl.int64)  # packed row offsets times Hq * D can pass 2^31
    else:
        start = 0
        length = N
    return start, length


@triton.jit
def widen(offs, IDX64: tl.constexpr):
    """Row/key indices as int64 where index * stride can pass 2^31 (the launcher checks every tensor's largest
    element offset), else int32, which keeps the address arithmetic and registers of common shapes small."""
    if IDX64:
        return offs.to(tl.int64)
    return offs


@triton.jit
def tile_and_group(N, BLOCK: tl.constexpr):
    """(tile index, batch x head index) of this program. The grid is one flat axis (tiles fastest, so programs
    that run together share a head's K/V as a 2-D grid would): axis 1 of a CUDA grid stops at 65535, which
    B x H passes with many short packed sequences."""
    tiles = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    return pid % tiles, (pid // tiles).to(tl.int64)


@triton.jit
def lse_row0(b, h, Hq, Nq, TotalQ, q_start, VARLEN: tl.constexpr):
    """Flat index in lse (and in the dropout counter) of the sequence's query row 0 for head h."""
    if VARLEN:
        row0 = h * TotalQ + q_start
    else:
        row0 = (b * Hq + h) * Nq
    return row0


@triton.jit
def key_runs(m0, Nq, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, shift, left, right):
    """Key runs for query rows [m0, m0 + BLOCK_M): [lo, a) partial, [a, mid) full tiles, [mid, hi) partial."""
    m_last = tl.minimum(m0 + BLOCK_M, Nq) - 1
    lo = tl.maximum(0, m0 + shift - left)
    hi = tl.minimum(Nk, m_last + shift + right + 1)
    hi = tl.maximum(hi, lo)
    a = tl.minimum(tl.maximum(m_last + shift - left, lo), hi)
    b = tl.minimum(tl.maximum(m0 + shift + right + 1, a), hi)
    mid = a + ((b - a) // BLOCK_N) * BLOCK_N
    return lo, a, mid, hi


@triton.jit
def query_range(n0, nq, nk, BLOCK_N: tl.constexpr, shift, left, right):
    """Query rows [lo, hi) that may see some key of the tile [n0, n0 + BLOCK_N): those with
    j - shift - right <= i <= j - shift + left for one of its keys j (the dK/dV kernel's loop)."""
    n_last = tl.minimum(n0 + BLOCK_N, nk) - 1
    lo = tl.maximum(0, n0 - shift - right)
    hi = tl.minimum(nq, n_last - shift + left + 1)
    return lo, hi


__all__ = ["MASK_ADD", "MASK_BOOL", "MASK_NONE", "dropout_keep", "key_runs", "lse_row0", "masked_scores", "mm",
           "query_range", "sequence_extent", "tile_and_group", "tile_scores", "widen"]
