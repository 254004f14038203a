"""Hopper (sm_90) attention forward: Q/K/V through TMA tensor descriptors, a wgmma in flight across the softmax.

The forward of genfast/kernels/attention.py with the same arguments, positions, dropout, lse and varlen layout
(the shared pieces are the jit helpers of genfast/kernels/_attention_jit.py, which both kernel modules import);
inputs with an attention mask keep attention.py's kernel.
What differs is how a key tile reaches the tensor cores:

- Q, K and V are read through tensor descriptors made on the device (``tl.make_tensor_descriptor``), one per
  (sequence, head): the copy engine moves whole tiles into shared memory, the ragged end of a sequence comes in
  as zeros, and the loop's pipeline stages hold TMA loads in flight rather than cp.async addresses in registers.
- The scores of a key tile run on the tensor cores while the warps do the softmax of the tile before it (the
  intra-warpgroup overlap of FlashAttention-3), as far as Triton's rules for asynchronous wgmma allow. Triton keeps
  a dot in flight only if its result is carried to the next loop iteration and read there after the first
  ``wgmma.wait_group 0``; a P @ V whose accumulator the next softmax rescales is waited for at once, and each such
  wait also waits for every score tile issued before it. A score tile carried in flight must not share registers
  with the tile being softmaxed: carrying one tile (score j + 1 issued before the softmax of j) made LLVM copy
  the in-flight registers at the loop's end (``mov.b32`` before the ``wait_group``), and ptxas then serialized
  every wgmma of the kernel (C7514). So the loop goes by pairs of tiles (a, b), each with its own registers:
  softmax of a, P @ V of a, the scores of the next a issued, the softmax of b while they run, the scores of the
  next b issued; the loop's top issues the previous b's P @ V (a zero P before the first pair), and an odd count's
  last tile goes alone after the loop. Half the softmaxes thus run beside a score matmul, no wgmma is serialized,
  and there is one wait per tile (benchmarks/results/compile-sm90a-*.md holds the machine code of both forms).
  Head dims over 128 go one tile at a time (two score tiles beside the accumulator spill there).
  With 8 warps on 128 rows, the two warpgroups also interleave on their own (the installed Tritons do not
  warp-specialize this loop on Hopper).

The launcher (genfast/kernels/attention.py, ``launch_forward``) takes this kernel on a GPU of capability 9.x for
fp16/bf16 inputs whose layout a descriptor can describe (rows 16-byte aligned, last dim contiguous) when a
measured tile fits, and the interpreter runs it on CPU tensors when asked (``tma=True`` or
GENFAST_ATTENTION_TMA=1), so the tests check it against the reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

from genfast.kernels._attention_configs import autotuned
from genfast.kernels._attention_jit import (
    dropout_keep,
    key_runs,
    lse_row0,
    masked_scores,
    mm,
    sequence_extent,
    tile_and_group,
    widen,
)


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr, F32_DOT: tl.constexpr):
    """acc + a @ b, accumulated inside the dot (a wgmma whose accumulator is ``acc``) on a GPU."""
    if F32_DOT:
        return acc + mm(a, b, PRECISION, F32_DOT)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _softmax_tile(qk, m_i, l_i, acc, seed, row0, offs_m, offs_n, mask_ptr, smm, smn, nq, nk, end, shift, left,
                  right, qk_scale, Nk, dropout_p, MASK_KIND: tl.constexpr, POSITION: tl.constexpr,
                  DROPOUT: tl.constexpr):
    """The online-softmax update of the key tile at ``offs_n`` from its raw scores ``qk``: (P in fp32, with
    dropout applied; the new row max; the new row sum; ``acc`` rescaled to the new max)."""
    s = masked_scores(qk * qk_scale, offs_m, offs_n, mask_ptr, smm, smn, nq, nk, end, shift, left, right,
                1.4426950408889634, MASK_KIND, POSITION)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only -inf so far keeps a finite shift, so exp2 gives 0 rather than NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(dropout_keep(seed, row0, offs_m, offs_n, Nk, dropout_p), p, 0.0)
    return p, m_new, l_i, acc * alpha[:, None]


@triton.jit
def _one_tile(q, k_desc, v_desc, start_n, m_i, l_i, acc, seed, row0, offs_m, offs_j, mask_ptr, smm, smn, nq, nk, end,
              shift, left, right, qk_scale, Nk, dropout_p, MASK_KIND: tl.constexpr, POSITION: tl.constexpr,
              DROPOUT: tl.constexpr, PRECISION: tl.constexpr, F32_DOT: tl.constexpr):
    """The key tile at ``start_n`` in order: its scores, their softmax, P @ V (each waited for)."""
    qk = mm(q, tl.trans(k_desc.load([start_n, 0])), PRECISION, F32_DOT)
    p, m_i, l_i, acc = _softmax_tile(qk, m_i, l_i, acc, seed, row0, offs_m, start_n + offs_j, mask_ptr, smm, smn, nq,
                                     nk, end, shift, left, right, qk_scale, Nk, dropout_p, MASK_KIND, POSITION,
                                     DROPOUT)
    acc = _mma(p.to(q.dtype), v_desc.load([start_n, 0]), acc, PRECISION, F32_DOT)
    return p, m_i, l_i, acc


@triton.jit
def _tile_pair(q, k_desc, v_desc, qa, qb, start_n, m_i, l_i, acc, seed, row0, offs_m, offs_j, mask_ptr, smm, smn, nq,
               nk, end, shift, left, right, qk_scale, Nk, dropout_p, MASK_KIND: tl.constexpr, POSITION: tl.constexpr,
               DROPOUT: tl.constexpr, PRECISION: tl.constexpr, F32_DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tiles a = ``start_n`` and b = a + BLOCK_N from their raw scores ``qa``, ``qb``: softmax of a, P @ V of a,
    scores of a + 2 tiles issued (into qa's registers, free by then), softmax of b while they run, scores of
    b + 2 tiles issued. Returns b's P (its P @ V is the caller's), the softmax state and the two new score tiles,
    which only the next pair reads. After the last pair nothing reads them (they hold the odd last tile, keys of the
    next run or TMA's zeros past the sequence): two spare score matmuls per run, rather than a branch that would
    make the wgmma synchronous."""
    p, m_i, l_i, acc = _softmax_tile(qa, m_i, l_i, acc, seed, row0, offs_m, start_n + offs_j, mask_ptr, smm, smn,
                                     nq, nk, end, shift, left, right, qk_scale, Nk, dropout_p, MASK_KIND, POSITION,
                                     DROPOUT)
    acc = _mma(p.to(q.dtype), v_desc.load([start_n, 0]), acc, PRECISION, F32_DOT)
    qa = mm(q, tl.trans(k_desc.load([start_n + 2 * BLOCK_N, 0])), PRECISION, F32_DOT)
    p, m_i, l_i, acc = _softmax_tile(qb, m_i, l_i, acc, seed, row0, offs_m, start_n + BLOCK_N + offs_j, mask_ptr,
                                     smm, smn, nq, nk, end, shift, left, right, qk_scale, Nk, dropout_p, MASK_KIND,
                                     POSITION, DROPOUT)
    qb = mm(q, tl.trans(k_desc.load([start_n + 3 * BLOCK_N, 0])), PRECISION, F32_DOT)
    return p, m_i, l_i, acc, qa, qb


@autotuned("fwd_tma")
@triton.jit
def _fwd_tma_kernel(Q, K, V, Mask, Seed, Out, Lse, CuQ, CuK,
                    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn, sob, soh, som,
                    Hq, Nq, Nk, TotalQ, TotalK, D, group, qk_scale, dropout_p, drop_scale, left, right,
                    q_bucket, k_bucket,
                    MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                    PRECISION: tl.constexpr, F32_DOT: tl.constexpr, VARLEN: tl.constexpr, IDX64: tl.constexpr,
                    BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = tile_and_group(Nq, BLOCK_M)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    m0 = pid_m * BLOCK_M
    q_start, nq = sequence_extent(CuQ, b, Nq, TotalQ, VARLEN)
    k_start, nk = sequence_extent(CuK, b, Nk, TotalK, VARLEN)
    if m0 >= nq:
        return
    row0 = lse_row0(b, h, Hq, Nq, TotalQ, q_start, VARLEN)
    offs_m = widen(m0 + tl.arange(0, BLOCK_M), IDX64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = widen(tl.arange(0, BLOCK_N), IDX64)
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
    lo, a, mid, hi = key_runs(m0, nq, nk, BLOCK_M, BLOCK_N, shift, left, right)
    for run in tl.static_range(3):
        if run == 0:
            start, end = lo, a
        elif run == 1:
            start, end = a, mid
        else:
            start, end = mid, hi
        # Head dims up to 128: tiles by pairs (a, b) so that each in-flight score tile has registers of its own (see
        # the module's docstring), and an odd count's last tile alone, in order. Over 128, one tile at a time: two
        # score tiles beside the accumulator spill there (76 B at M128 N32).
        tiles = tl.cdiv(end - start, BLOCK_N)
        if BLOCK_D > 128:  # constexpr branches: each form's loads get shared memory only where it is compiled
            for start_n in range(start, end, BLOCK_N):
                p, m_i, l_i, acc = _one_tile(q, k_desc, v_desc, start_n, m_i, l_i, acc, seed, row0, offs_m, offs_j,
                                             mask_ptr, smm, smn, nq, nk, end, shift, left, right, qk_scale, Nk,
                                             dropout_p, MASK_KIND, run != 1, DROPOUT, PRECISION, F32_DOT)
        else:
            pairs_end = start + (tiles // 2) * 2 * BLOCK_N
            if start < pairs_end:
                qa = mm(q, tl.trans(k_desc.load([start, 0])), PRECISION, F32_DOT)
                qb = mm(q, tl.trans(k_desc.load([start + BLOCK_N, 0])), PRECISION, F32_DOT)
                # The loop's top does the P @ V of the previous pair's b tile: none before the first pair, so a
                # zero P there (one spare matmul per run, rather than the pair's code again before the loop, whose
                # loads would each need their own shared memory).
                p = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                for start_n in range(start, pairs_end, 2 * BLOCK_N):
                    # Waited for at once (an accumulator the next softmax rescales cannot stay in flight), which
                    # also waits for the scores issued last iteration.
                    acc = _mma(p.to(q.dtype), v_desc.load([start_n - BLOCK_N, 0]), acc, PRECISION, F32_DOT)
                    p, m_i, l_i, acc, qa, qb = _tile_pair(q, k_desc, v_desc, qa, qb, start_n, m_i, l_i, acc, seed,
                                                          row0, offs_m, offs_j, mask_ptr, smm, smn, nq, nk, end,
                                                          shift, left, right, qk_scale, Nk, dropout_p, MASK_KIND,
                                                          run != 1, DROPOUT, PRECISION, F32_DOT, BLOCK_N)
                acc = _mma(p.to(q.dtype), v_desc.load([pairs_end - BLOCK_N, 0]), acc, PRECISION, F32_DOT)
            if tiles % 2 == 1:
                p, m_i, l_i, acc = _one_tile(q, k_desc, v_desc, pairs_end, m_i, l_i, acc, seed, row0, offs_m, offs_j,
                                             mask_ptr, smm, smn, nq, nk, end, shift, left, right, qk_scale, Nk,
                                             dropout_p, MASK_KIND, run != 1, DROPOUT, PRECISION, F32_DOT)

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
