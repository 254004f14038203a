"""Hopper (sm_90) attention forward: Q/K/V through TMA tensor descriptors, a wgmma in flight across the softmax.

The forward of genfast/kernels/attention.py with the same arguments, positions, dropout, lse and varlen layout
(the shared pieces are that module's jit helpers); inputs with an attention mask keep that module's kernel.
What differs is how a key tile reaches the tensor cores:

- Q, K and V are read through tensor descriptors made on the device (``tl.make_tensor_descriptor``), one per
  (sequence, head): the copy engine moves whole tiles into shared memory, the ragged end of a sequence comes in
  as zeros, and the loop's pipeline stages hold TMA loads in flight rather than cp.async addresses in registers.
- The loop is software-pipelined by hand one tile deep. Iteration j issues P @ V of tile j - 1 (waited for at
  once: Triton makes an accumulating dot whose result is rescaled synchronous), then the scores of tile j + 1
  (``q @ k^T``), which only iteration j + 1 reads, then the softmax of tile j. That wgmma group thus runs on the
  tensor cores while the warps do the exp2 and row sums (FlashAttention-3's intra-warpgroup overlap); in the PTX
  the softmax's ``ex2`` sits between its ``wgmma.commit_group`` and the next ``wgmma.wait_group 0``, which the
  compile gate reports as ``wgmma_async``. With 8 warps on 128 rows, the two warpgroups interleave on their own
  (the installed Tritons do not warp-specialize this loop on Hopper).

The launcher (genfast/kernels/attention.py, ``_launch_fwd``) takes this kernel on a GPU of capability 9.x for
fp16/bf16 inputs whose layout a descriptor can describe (rows 16-byte aligned, last dim contiguous) when a
measured tile fits, and the interpreter runs it on CPU tensors when asked (``tma=True`` or
GENFAST_ATTENTION_TMA=1), so the tests check it against the reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

from genfast.kernels.attention import _extent, _keep, _masked, _mm, _row0, _row_range, _tile_and_group, _tuned, _wide


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, F32_DOT: tl.constexpr):
    """acc + a @ b, accumulated inside the dot (a wgmma whose accumulator is ``acc``) on a GPU."""
    if F32_DOT:
        return acc + _mm(a, b, PRECISION, F32_DOT)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _softmax_tile(qk, m_i, l_i, acc, seed, row0, offs_m, offs_n, mask_ptr, smm, smn, nq, nk, end, shift, left,
                  right, qk_scale, Nk, dropout_p, MASK_KIND: tl.constexpr, POSITION: tl.constexpr,
                  DROPOUT: tl.constexpr):
    """The online-softmax update of the key tile at ``offs_n`` from its raw scores ``qk``: (P in fp32, with
    dropout applied; the new row max; the new row sum; ``acc`` rescaled to the new max)."""
    s = _masked(qk * qk_scale, offs_m, offs_n, mask_ptr, smm, smn, nq, nk, end, shift, left, right,
                1.4426950408889634, MASK_KIND, POSITION)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only -inf so far keeps a finite shift, so exp2 gives 0 rather than NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_keep(seed, row0, offs_m, offs_n, Nk, dropout_p), p, 0.0)
    return p, m_new, l_i, acc * alpha[:, None]


@_tuned("fwd_tma")
@triton.jit
def _fwd_tma_kernel(Q, K, V, Mask, Seed, Out, Lse, CuQ, CuK,
                    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn, sob, soh, som,
                    Hq, Nq, Nk, TotalQ, TotalK, D, group, qk_scale, dropout_p, drop_scale, left, right,
                    q_bucket, k_bucket,
                    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    PRECISION: tl.constexpr, F32_DOT: tl.constexpr, VARLEN: tl.constexpr, IDX64: tl.constexpr,
                    BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = _tile_and_group(Nq, BLOCK_M)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    m0 = pid_m * BLOCK_M
    q_start, nq = _extent(CuQ, b, Nq, TotalQ, VARLEN)
    k_start, nk = _extent(CuK, b, Nk, TotalK, VARLEN)
    if m0 >= nq:
        return
    row0 = _row0(b, h, Hq, Nq, TotalQ, q_start, VARLEN)
    offs_m = _wide(m0 + tl.arange(0, BLOCK_M), IDX64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = _wide(tl.arange(0, BLOCK_N), IDX64)
    # One descriptor per sequence and head: its shape ends at the sequence's last row and at D, so TMA fills the
    # ragged end of the sequence and the head-dim padding with zeros (the loads need no masks).
    q_desc = tl.make_tensor_descriptor(Q + b * sqb + h * sqh + q_start * sqm, shape=[nq, D], strides=[sqm, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    k_desc = tl.make_tensor_descriptor(K + b * skb + hk * skh + k_start * skn, shape=[nk, D], strides=[skn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V + b * svb + hk * svh + k_start * svn, shape=[nk, D], strides=[svn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    q = q_desc.load([m0, 0])
    mask_ptr = Mask + b * smb + h * smh
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed).to(tl.uint64)
    shift = nk - nq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, a, mid, hi = _row_range(m0, nq, nk, BLOCK_M, BLOCK_N, shift, left, right)
    for run in tl.static_range(3):
        if run == 0:
            start, end = lo, a
        elif run == 1:
            start, end = a, mid
        else:
            start, end = mid, hi
        if start < end:
            # Tile j's P @ V is issued and waited for in iteration j + 1, right before the scores of tile j + 2
            # are issued; those stay in flight (only iteration j + 2 reads them) while this iteration runs the
            # softmax of tile j + 1. The first tile's scores and softmax come before the loop.
            qk = _mm(q, tl.trans(k_desc.load([start, 0])), PRECISION, F32_DOT)
            p, m_i, l_i, acc = _softmax_tile(qk, m_i, l_i, acc, seed, row0, offs_m, start + offs_j, mask_ptr, smm,
                                             smn, nq, nk, end, shift, left, right, qk_scale, Nk, dropout_p,
                                             MASK_KIND, run != 1, DROPOUT)
            qk = _mm(q, tl.trans(k_desc.load([start + BLOCK_N, 0])), PRECISION, F32_DOT)
            for start_n in range(start + BLOCK_N, end, BLOCK_N):
                acc = _mma(p.to(q.dtype), v_desc.load([start_n - BLOCK_N, 0]), acc, PRECISION,
                           F32_DOT)
                # Past the run's end this reads keys the position mask hides, or TMA's zeros past the sequence:
                # one spare tile per run, rather than a branch that would make the wgmma synchronous.
                qk_next = _mm(q, tl.trans(k_desc.load([start_n + BLOCK_N, 0])), PRECISION, F32_DOT)
                p, m_i, l_i, acc = _softmax_tile(qk, m_i, l_i, acc, seed, row0, offs_m, start_n + offs_j, mask_ptr,
                                                 smm, smn, nq, nk, end, shift, left, right, qk_scale, Nk, dropout_p,
                                                 MASK_KIND, run != 1, DROPOUT)
                qk = qk_next
            last = start + ((end - 1 - start) // BLOCK_N) * BLOCK_N
            acc = _mma(p.to(q.dtype), v_desc.load([last, 0]), acc, PRECISION, F32_DOT)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (drop_scale / l_safe)[:, None]
    row_ok = offs_m < nq
    d_ok = offs_d < D
    out_ptr = Out + b * sob + h * soh + (q_start + offs_m[:, None]) * som + offs_d[None, :]
    tl.store(out_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(Lse + row0 + offs_m, lse, mask=row_ok)


__all__ = ["_fwd_tma_kernel"]
