"""Triton kernels of genfast::attention_fwd_triton / attention_bwd_triton (FlashAttention-2 style).

Forward: one program per (BLOCK_M query rows, batch x query head). It streams key/value tiles through an
online softmax in base 2 (``exp2`` with ``scale * log2(e)`` folded into the scores), keeps only O(BLOCK_M x D)
state and writes out [B, Hq, Nq, D] and lse [B, Hq, Nq] (natural log, fp32). Only key tiles that some row
of the block may see are visited; they are split into three runs: the tiles every row sees in full (no
position mask is computed there) and the partial tiles before and after them (the causal diagonal, the
window's edges, the ragged end of Nk), where the position mask is applied.

Backward: ``delta = rowsum(dO * O) - dlse`` (a small kernel), then one program per key/value tile that
accumulates dK and dV over every query head of its GQA group (no atomics for them). By default that program also
adds its share of dQ into an fp32 buffer with atomics (five matmuls per tile: S, dP, dV, dK, dQ); under
``torch.use_deterministic_algorithms(True)``, or where no measured tile holds it (``five_matmul_backward``), one
program per query tile computes dQ instead, in a fixed order. Each recomputes P from q, k and lse, and redraws
the dropout mask from the seed. On Hopper (genfast/kernels/attention_sm90.py for the forward) the tiles come
through TMA descriptors.

Masks: an attn_mask arrives as a [B, Hq, Nq, Nk] view with stride 0 along broadcast dims, so a [Nq, Nk] or
[B, 1, 1, Nk] mask is read without being materialised. Head dims are padded to a power of two >= 16
(BLOCK_D) with masked loads, so D = 80 or 96 work. Offsets of batch/head are int64; row and key offsets are
int64 too when some element offset of a tensor reaches 2^31 (``IDX64``, chosen by the launcher), int32 otherwise.

Tiles on a GPU: each kernel autotunes over the candidates that ``config_fits`` keeps (genfast/kernels/
_attention_configs.py: the measured tile tables, the register and shared-memory budgets, the autotune policy and
the environment that steers them). The jit helpers the kernels share with attention_sm90.py, and the window rule
as the kernels apply it, are in genfast/kernels/_attention_jit.py. The launchers pass one call's arguments as a
``LaunchArgs`` record.

Varlen (``VARLEN=True``, launched by genfast/kernels/attention_varlen.py): the same kernels on packed
[total, H, D] tensors seen as [1, H, total, D] with batch stride 0; "batch" b is then a sequence whose rows
[cu[b], cu[b + 1]) and lengths each program reads from cu_seqlens (Nq/Nk are the max lengths the grid is
sized for), and programs whose tile starts past their sequence's length return at once. lse and the dropout
counter use the row's flat index in lse, ``row0 + i`` ((b * Hq + h) * Nq + i, or h * total_q + cu_q[b] + i).

Grids are one flat axis (tile index fastest), so B x H may pass the 65535 limit of a CUDA grid's axis 1.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from genfast.kernels import _attention_configs as configs
from genfast.kernels import attention_sm90
from genfast.kernels._attention_configs import autotuned
from genfast.kernels._attention_jit import (
    MASK_ADD,
    MASK_BOOL,
    MASK_NONE,
    dropout_keep,
    key_runs,
    lse_row0,
    mm,
    query_range,
    sequence_extent,
    tile_and_group,
    tile_scores,
    widen,
)

LOG2E = 1.4426950408889634  # the kernels spell it out: Triton globals must be constexpr


@autotuned("fwd")
@triton.jit
def _fwd_kernel(Q, K, V, Mask, Seed, Out, Lse, CuQ, CuK,
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
    # Varlen: b is a sequence, Nq/Nk are the max lengths the grid was sized for, nq/nk this sequence's lengths.
    q_start, nq = sequence_extent(CuQ, b, Nq, TotalQ, VARLEN)
    k_start, nk = sequence_extent(CuK, b, Nk, TotalK, VARLEN)
    if m0 >= nq:
        return
    row0 = lse_row0(b, h, Hq, Nq, TotalQ, q_start, VARLEN)
    offs_m = widen(m0 + tl.arange(0, BLOCK_M), IDX64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = widen(tl.arange(0, BLOCK_N), IDX64)
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + (q_start + offs_m[:, None]) * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < nq) & d_ok[None, :], other=0.0)
    k_base = K + b * skb + hk * skh + k_start * skn
    v_base = V + b * svb + hk * svh + k_start * svn
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
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + offs_j
            n_ok = offs_n < end
            kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None],
                         other=0.0)
            v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)
            s = tile_scores(q, kt, offs_m, offs_n, mask_ptr, smm, smn, nq, nk, end, shift, left, right, qk_scale,
                        1.4426950408889634, MASK_KIND, run != 1, PRECISION, F32_DOT)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen only -inf so far keeps a finite shift, so exp2 gives 0 rather than NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:
                p = tl.where(dropout_keep(seed, row0, offs_m, offs_n, Nk, dropout_p), p, 0.0)
            acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, PRECISION, F32_DOT)
            m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (drop_scale / l_safe)[:, None]
    row_ok = offs_m < nq
    out_ptr = Out + b * sob + h * soh + (q_start + offs_m[:, None]) * som + offs_d[None, :]
    tl.store(out_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(Lse + row0 + offs_m, lse, mask=row_ok)


@triton.jit
def _delta_kernel(Out, dOut, dLse, Delta, sob, soh, som, sdb, sdh, sdm, sdd, Hq, Nq, D,
                  HAS_DLSE: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = sum_d dO_i * O_i - dlse_i: the row term of the softmax backward."""
    pid_m, bh = tile_and_group(Nq, BLOCK_M)
    b = bh // Hq
    h = bh % Hq
    offs_m = widen(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), IDX64)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Nq) & (offs_d[None, :] < D)
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(dOut + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=ok,
                 other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(dLse + bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
    tl.store(Delta + bh * Nq + offs_m, delta, mask=offs_m < Nq)


@autotuned("dkdv")
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, dOut, Lse, Delta, Mask, Seed, dK, dV, dQacc, CuQ, CuK,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                     smb, smh, smm, smn, sgb, sgh, sgn, sab, sah, sam,
                     Hq, Hk, Nq, Nk, TotalQ, TotalK, D, group, qk_scale, scale, dropout_p, drop_scale, left, right,
                     q_bucket, k_bucket,
                     MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     PRECISION: tl.constexpr, F32_DOT: tl.constexpr, VARLEN: tl.constexpr, IDX64: tl.constexpr,
                     DQ_ATOMIC: tl.constexpr, TMA: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key tile, summed over the query heads of its GQA group (no atomics).

    ``DQ_ATOMIC``: also add this key tile's share of dQ, dS @ K, into the fp32 ``dQacc`` with atomics: the whole
    backward in five matmuls per tile (S, dP, dV, dK, dQ) instead of seven with the separate dQ pass, at the price
    of a summation order that varies from run to run; 1: per-element atomics, 2: one bulk TMA reduction per tile
    (sm_90; the interpreter has no descriptor reductions). ``TMA``: read K, V, Q and dO tiles through tensor
    descriptors (sm_90; rows need no masks: TMA fills what lies past the sequence with zeros)."""
    pid_n, bhk = tile_and_group(Nk, BLOCK_N)
    b = bhk // Hk
    hk = bhk % Hk
    n0 = pid_n * BLOCK_N
    q_start, nq = sequence_extent(CuQ, b, Nq, TotalQ, VARLEN)
    k_start, nk = sequence_extent(CuK, b, Nk, TotalK, VARLEN)
    if n0 >= nk:
        return
    offs_n = widen(n0 + tl.arange(0, BLOCK_N), IDX64)
    offs_i = widen(tl.arange(0, BLOCK_M), IDX64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < nk
    kv_ok = n_ok[:, None] & d_ok[None, :]
    if TMA:  # straight into shared memory, where the matmuls read them
        k = tl.make_tensor_descriptor(K + b * skb + hk * skh + k_start * skn, shape=[nk, D], strides=[skn, 1],
                                      block_shape=[BLOCK_N, BLOCK_D]).load([n0, 0])
        v = tl.make_tensor_descriptor(V + b * svb + hk * svh + k_start * svn, shape=[nk, D], strides=[svn, 1],
                                      block_shape=[BLOCK_N, BLOCK_D]).load([n0, 0])
    else:
        k = tl.load(K + b * skb + hk * skh + (k_start + offs_n[:, None]) * skn + offs_d[None, :] * skd, mask=kv_ok,
                    other=0.0)
        v = tl.load(V + b * svb + hk * svh + (k_start + offs_n[:, None]) * svn + offs_d[None, :] * svd, mask=kv_ok,
                    other=0.0)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed).to(tl.uint64)
    shift = nk - nq
    lo, hi = query_range(n0, nq, nk, BLOCK_N, shift, left, right)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(group):
        h = hk * group + g
        row0 = lse_row0(b, h, Hq, Nq, TotalQ, q_start, VARLEN)
        q_base = Q + b * sqb + h * sqh + q_start * sqm
        do_base = dOut + b * sdb + h * sdh + q_start * sdm
        dq_base = dQacc + b * sab + h * sah + q_start * sam
        mask_ptr = Mask + b * smb + h * smh
        if TMA:
            q_desc = tl.make_tensor_descriptor(q_base, shape=[nq, D], strides=[sqm, 1], block_shape=[BLOCK_M, BLOCK_D])
            do_desc = tl.make_tensor_descriptor(do_base, shape=[nq, D], strides=[sdm, 1],
                                                block_shape=[BLOCK_M, BLOCK_D])
            if DQ_ATOMIC == 2:
                dq_desc = tl.make_tensor_descriptor(dq_base, shape=[nq, D], strides=[sam, 1],
                                                    block_shape=[BLOCK_M, BLOCK_D])
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_i
            m_ok = offs_m < nq
            if TMA:
                q = q_desc.load([start_m, 0])
                do = do_desc.load([start_m, 0])
            else:
                q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                            mask=m_ok[:, None] & d_ok[None, :], other=0.0)
                do = tl.load(do_base + offs_m[:, None] * sdm + offs_d[None, :] * sdd,
                             mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(Lse + row0 + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(Delta + row0 + offs_m, mask=m_ok, other=0.0)
            # Rows with no visible key have lse = -inf and only -inf scores: a zero shift gives P = 0 there.
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            # Scores as [BLOCK_M, BLOCK_N] through the shared helper (bounds/positions always on here: the rows
            # of a key tile cross the diagonal at a different place per tile), then transposed views.
            s = tile_scores(q, tl.trans(k), offs_m, offs_n, mask_ptr, smm, smn, nq, nk, nk, shift, left, right,
                        scale, 1.0, MASK_KIND, True, PRECISION, F32_DOT)
            s = tl.where(m_ok[:, None], s, float("-inf"))
            p = tl.exp2((s - lse[:, None]) * 1.4426950408889634)
            dp = mm(do, tl.trans(v), PRECISION, F32_DOT)
            if DROPOUT:
                keep = dropout_keep(seed, row0, offs_m, offs_n, Nk, dropout_p)
                p_drop = tl.where(keep, p * drop_scale, 0.0)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            else:
                p_drop = p
            dv += mm(tl.trans(p_drop.to(do.dtype)), do, PRECISION, F32_DOT)
            ds = (p * (dp - delta[:, None])).to(q.dtype)
            dk += mm(tl.trans(ds), q, PRECISION, F32_DOT)
            if DQ_ATOMIC:
                # dQ's scale is applied when the launcher converts the fp32 sum to q's dtype.
                dq = mm(ds, k, PRECISION, F32_DOT)
                if DQ_ATOMIC == 2:  # one bulk reduction through shared memory: no per-element addresses
                    dq_desc.atomic_add([start_m, 0], dq)
                else:
                    tl.atomic_add(dq_base + offs_m[:, None] * sam + offs_d[None, :], dq,
                                  mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")

    out_ptr = b * sgb + hk * sgh + (k_start + offs_n[:, None]) * sgn + offs_d[None, :]
    tl.store(dK + out_ptr, (dk * scale).to(dK.dtype.element_ty), mask=kv_ok)
    tl.store(dV + out_ptr, dv.to(dV.dtype.element_ty), mask=kv_ok)


@autotuned("dq")
@triton.jit
def _bwd_dq_kernel(Q, K, V, dOut, Lse, Delta, Mask, Seed, dQ, CuQ, CuK,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                   smb, smh, smm, smn, sob, soh, som,
                   Hq, Nq, Nk, TotalQ, TotalK, D, group, qk_scale, scale, dropout_p, drop_scale, left, right,
                   q_bucket, k_bucket,
                   MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   PRECISION: tl.constexpr, F32_DOT: tl.constexpr, VARLEN: tl.constexpr, IDX64: tl.constexpr,
                   BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query tile; visits the same key runs as the forward."""
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
    d_ok = offs_d < D
    m_ok = offs_m < nq
    qo_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + (q_start + offs_m[:, None]) * sqm + offs_d[None, :] * sqd, mask=qo_ok,
                other=0.0)
    do = tl.load(dOut + b * sdb + h * sdh + (q_start + offs_m[:, None]) * sdm + offs_d[None, :] * sdd, mask=qo_ok,
                 other=0.0)
    lse = tl.load(Lse + row0 + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(Delta + row0 + offs_m, mask=m_ok, other=0.0)
    # P is recomputed as exp(s - lse) in the units lse is stored in (natural), then one multiply into base 2.
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    k_base = K + b * skb + hk * skh + k_start * skn
    v_base = V + b * svb + hk * svh + k_start * svn
    mask_ptr = Mask + b * smb + h * smh
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed).to(tl.uint64)
    shift = nk - nq

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, a, mid, hi = key_runs(m0, nq, nk, BLOCK_M, BLOCK_N, shift, left, right)
    for run in tl.static_range(3):
        if run == 0:
            start, end = lo, a
        elif run == 1:
            start, end = a, mid
        else:
            start, end = mid, hi
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + offs_j
            n_ok = offs_n < end
            kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None],
                         other=0.0)
            vt = tl.load(v_base + offs_n[None, :] * svn + offs_d[:, None] * svd, mask=n_ok[None, :] & d_ok[:, None],
                         other=0.0)
            s = tile_scores(q, kt, offs_m, offs_n, mask_ptr, smm, smn, nq, nk, end, shift, left, right, scale, 1.0,
                        MASK_KIND, run != 1, PRECISION, F32_DOT)
            p = tl.exp2((s - lse[:, None]) * 1.4426950408889634)
            dp = mm(do, vt, PRECISION, F32_DOT)
            if DROPOUT:
                dp = tl.where(dropout_keep(seed, row0, offs_m, offs_n, Nk, dropout_p), dp * drop_scale, 0.0)
            ds = p * (dp - delta[:, None])
            dq += mm(ds.to(kt.dtype), tl.trans(kt), PRECISION, F32_DOT)
    tl.store(dQ + b * sob + h * soh + (q_start + offs_m[:, None]) * som + offs_d[None, :],
             (dq * scale).to(dQ.dtype.element_ty), mask=qo_ok)


# ------------------------------------------------------------------------------------------ launchers
@dataclasses.dataclass(frozen=True)
class KernelFlags:
    """The constexpr flags of one call: each set is a compiled variant of the kernels, and part of their autotune
    key."""

    mask_kind: int  # MASK_NONE, MASK_BOOL or MASK_ADD (genfast/kernels/_attention_jit.py)
    dropout: bool
    has_window: bool  # causal or a window cuts some row's keys: tuned apart from the full rows
    precision: str  # tl.dot's input_precision: "ieee" for fp32 inputs, else "tf32"
    f32_dot: bool  # bf16 under the interpreter: its dots in fp32 (see mm)
    block_d: int  # the head dim padded to a power of two >= 16

    def constexprs(self) -> dict:
        return dict(MASK_KIND=self.mask_kind, DROPOUT=self.dropout, HAS_WINDOW=self.has_window,
                    PRECISION=self.precision, F32_DOT=self.f32_dot, BLOCK_D=self.block_d)


@dataclasses.dataclass(frozen=True)
class LaunchArgs:
    """What every kernel of one call reads beside the tensors and the layout: the mask view and its strides, the
    seed, the heads, the resolved window bounds and the flags."""

    mask: torch.Tensor  # the [B, Hq, Nq, Nk] view (bool seen as uint8), or q where there is none (never read)
    mask_strides: tuple[int, ...]
    seed: torch.Tensor  # the Philox seed, or q without dropout (never read)
    hq: int
    hk: int
    d: int
    left: int  # window_bounds: the query at position p sees keys p - left <= j <= p + right
    right: int
    drop_scale: float
    flags: KernelFlags

    @property
    def group(self) -> int:
        return self.hq // self.hk

    @property
    def mask_read(self) -> torch.Tensor | None:
        """The mask where the kernels read it (for the int64 offsets check), else None."""
        return self.mask if self.flags.mask_kind != MASK_NONE else None


def launch_args(q, k, attn_mask, seed, dropout_p, window) -> LaunchArgs:
    """The LaunchArgs of one call. ``q`` and ``k`` are [B, H, N, D] (for the varlen layout, the [1, H, total, D]
    views of the packed tensors). ``window``: (left, right, bounded), the bounds genfast.ops._attention_common.
    window_bounds resolved from causal and the window (the rule lives there; the kernels only apply them)."""
    hq, d = q.shape[1], q.shape[3]
    if attn_mask is None:
        mask, mask_strides, kind = q, (0, 0, 0, 0), MASK_NONE
    elif attn_mask.dtype == torch.bool:
        # Same bytes, a dtype every Triton version loads.
        mask, kind = attn_mask.view(torch.uint8), MASK_BOOL
        mask_strides = mask.stride()
    else:
        mask, mask_strides, kind = attn_mask, attn_mask.stride(), MASK_ADD
    left, right, bounded = window
    if left < 0 or right < 0:
        raise ValueError(f"attention kernels: window bounds must be resolved (>= 0), got ({left}, {right})")
    dropout = dropout_p > 0.0
    flags = KernelFlags(mask_kind=kind, dropout=dropout, has_window=bool(bounded),
                        precision="ieee" if q.dtype == torch.float32 else "tf32",
                        f32_dot=q.dtype == torch.bfloat16 and q.device.type == "cpu",
                        block_d=max(16, triton.next_power_of_2(d)))
    return LaunchArgs(mask=mask, mask_strides=tuple(mask_strides), seed=seed if dropout else q, hq=hq, hk=k.shape[1],
                      d=d, left=left, right=right, drop_scale=1.0 / (1.0 - dropout_p), flags=flags)


class Layout:
    """Where the kernels find each sequence: padded [B, H, N, D] tensors (``cu_q is None``), or packed
    [total, H, D] ones whose sequence b holds rows [cu[b], cu[b + 1]) (FlashAttention's varlen layout).

    The kernels see both as [B, H, N, D] strides; packed tensors become [1, H, total, D] views whose batch
    stride is passed as 0, the rows of sequence b being found from cu_seqlens instead.
    """

    def __init__(self, q4, k4, cu_q=None, cu_k=None, max_q=None, max_k=None):
        self.varlen = cu_q is not None
        if self.varlen:
            self.nseq, self.max_q, self.max_k = cu_q.shape[0] - 1, max_q, max_k
            self.cu_q, self.cu_k = cu_q, cu_k
        else:
            self.nseq, self.max_q, self.max_k = q4.shape[0], q4.shape[2], k4.shape[2]
            self.cu_q = self.cu_k = q4  # never read (VARLEN is a constexpr False)
        self.total_q, self.total_k = q4.shape[2], k4.shape[2]

    def strides(self, t4, n=4):
        st = t4.stride()
        return ((0,) + st[1:n]) if self.varlen else st[:n]


def packed_view(t):
    """[total, H, D] -> [1, H, total, D], no copy."""
    return t.transpose(0, 1).unsqueeze(0)


def needs_int64(*tensors) -> bool:
    """Whether some element offset (sum of index * stride) of these tensors reaches 2^31, so that the kernels
    must compute row/key offsets in int64 (IDX64)."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= 2**31
               for t in tensors if t is not None and t.numel() > 0)


def _descriptor_layout(t) -> bool:
    """TMA's layout rules for a [B, H, N, D] tensor: the last dim contiguous, the start and the other strides
    16-byte aligned (strides of 0, the varlen batch, are fine)."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return False
    size = t.element_size()
    return not (t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]))


def tma_eligible(*tensors, accumulators=()) -> bool:
    """Whether tensor descriptors can describe these [B, H, N, D] fp16/bf16 tensors, and the fp32
    ``accumulators`` a descriptor reduces into (the backward's dQ sum: its rows are 4 * D bytes apart, so a q
    whose padded rows are aligned may still give it unaligned ones when D % 4 != 0)."""
    if any(t.dtype not in (torch.float16, torch.bfloat16) for t in tensors):
        return False
    return all(_descriptor_layout(t) for t in (*tensors, *accumulators))


# One allocator per device, made once: Triton keeps the allocator in a ContextVar and asks it for scratch at each
# launch, so it is (re)set to the launch's device before every launch.
_SCRATCH_ALLOCATORS: dict = {}


def scratch_allocator(device: torch.device):
    """The allocator of descriptor scratch on ``device``: torch's caching allocator (so CUDA-graph capture and
    streams work as for any tensor)."""
    device = torch.device(device)
    if device not in _SCRATCH_ALLOCATORS:
        def scratch(size: int, alignment: int, stream):
            return torch.empty(size, dtype=torch.int8, device=device)

        _SCRATCH_ALLOCATORS[device] = scratch
    return _SCRATCH_ALLOCATORS[device]


def set_scratch_allocator(device: torch.device) -> None:
    """Descriptors made on the device live in a little global scratch per program, which Triton asks of the
    allocator given to ``triton.set_allocator``. Give it the allocator of ``device`` (the launch's tensors'), unless
    the caller has set one of their own; one of ours made for another device is replaced, since an allocator
    pinned to the first device seen would hand a launch on a second GPU scratch on the first."""
    current = _allocation._allocator.get()
    if current is not _allocation._NULL_ALLOCATOR and current not in _SCRATCH_ALLOCATORS.values():
        return
    triton.set_allocator(scratch_allocator(device))


def use_tma(q4, k4, v4, *more, accumulators=(), tma=None) -> bool:
    """Take the Hopper forward (genfast/kernels/attention_sm90.py)? ``tma=None``: on a GPU of capability 9.x when
    the tensors (and the fp32 ``accumulators`` a descriptor reduces into) allow it; True: always (the interpreter
    runs it on CPU tensors; a layout TMA cannot describe raises); False: never."""
    if tma is None:
        requested = configs.tma_requested()  # GENFAST_ATTENTION_TMA
        if requested is False:
            return False
        hopper = q4.is_cuda and configs.device_capability()[0] == 9
        tma = (hopper or requested is True) and tma_eligible(q4, k4, v4, *more, accumulators=accumulators)
    elif tma and not tma_eligible(q4, k4, v4, *more, accumulators=accumulators):
        raise ValueError("tma=True needs fp16/bf16 q, k, v with a contiguous head dim and 16-byte aligned rows "
                         "(and, for the backward, a head dim that is a multiple of 4: dQ's fp32 rows)")
    if tma:
        set_scratch_allocator(q4.device)
    return bool(tma)


def _launch(kernel, grid, args, kwargs, autotune=None):
    """Launch an autotuned kernel, or, without autotuning, its heuristic config: the first candidate the
    rules keep for these arguments (no benchmarking)."""
    if autotune is None:
        autotune = configs.autotune_enabled()
    with on_device_of(args[0]):
        if autotune:
            kernel[grid](*args, **kwargs)
            return
        config = configs.heuristic_config(kernel, dict(zip(kernel.arg_names, args)), kwargs)
        kernel.fn[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def on_device_of(t):
    """Triton launches on the current CUDA device (and asks the scratch allocator there): make it ``t``'s own, so
    a call on cuda:1 from code whose current device is cuda:0 runs where its tensors are."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def launch_forward(q4, k4, v4, out4, lse, lay: Layout, c: LaunchArgs, scale, dropout_p, autotune=None, tma=None):
    def grid(meta):
        return (triton.cdiv(lay.max_q, meta["BLOCK_M"]) * lay.nseq * c.hq,)

    args = (
        q4, k4, v4, c.mask, c.seed, out4, lse, lay.cu_q, lay.cu_k, *lay.strides(q4), *lay.strides(k4),
        *lay.strides(v4), *c.mask_strides, *lay.strides(out4, 3), c.hq, lay.max_q, lay.max_k, lay.total_q,
        lay.total_k, c.d, c.group, scale * LOG2E, dropout_p, c.drop_scale, c.left, c.right,
        configs.length_bucket(lay.max_q), configs.length_bucket(lay.max_k),
    )
    idx64 = needs_int64(q4, k4, v4, out4, c.mask_read)
    kernel = _fwd_kernel
    if use_tma(q4, k4, v4, tma=tma) and configs.tma_forward_fits(c.flags.block_d, q4.element_size(), c.flags.dropout,
                                                                 c.flags.mask_kind != MASK_NONE):
        kernel = attention_sm90._fwd_tma_kernel  # the module's attribute: the compile gate reloads the module
    _launch(kernel, grid, args, dict(VARLEN=lay.varlen, IDX64=idx64, **c.flags.constexprs()), autotune)


def launch_backward(grad_out4, grad_lse, q4, k4, v4, out4, lse, dq4, dk4, dv4, lay: Layout, c: LaunchArgs, scale,
                    dropout_p, autotune=None, tma=None):
    """delta, then dK/dV per key tile; dQ either added by that same kernel with fp32 atomics (five matmuls per
    tile), or, under ``torch.use_deterministic_algorithms(True)``, by its own pass (seven, a fixed order)."""
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    block_d = c.flags.block_d
    block_m = (64 if configs.AUTOTUNE else 16) * 64 // max(64, block_d)  # o and dO rows in fp32: 32 at d256, no spill
    idx64 = needs_int64(q4, k4, v4, out4, grad_out4, dq4, dk4, dv4, c.mask_read)
    # delta for every stored row, whatever sequence it belongs to: lse is [B, Hq, Nq] (or [Hq, total_q], B = 1).
    rows = lse.shape[-1]
    with on_device_of(out4):
        _delta_kernel[(triton.cdiv(rows, block_m) * (lse.numel() // max(rows, 1)),)](
            out4, grad_out4, grad_lse.contiguous() if grad_lse is not None else lse, delta, *out4.stride()[:3],
            *grad_out4.stride(), c.hq, rows, c.d, HAS_DLSE=grad_lse is not None, IDX64=idx64,
            BLOCK_M=block_m, BLOCK_D=block_d,
        )
    atomic = configs.five_matmul_backward(q4.element_size(), block_d,
                                          c.flags.mask_kind != MASK_NONE or c.flags.dropout)
    dq_acc = torch.zeros(q4.shape, dtype=torch.float32, device=q4.device) if atomic else dq4
    tma = use_tma(q4, k4, v4, grad_out4, accumulators=(dq_acc,) if atomic else (), tma=tma)
    reduce = 0 if not atomic else 2 if tma and not configs.interpreting() else 1
    strides = (*lay.strides(q4), *lay.strides(k4), *lay.strides(v4), *lay.strides(grad_out4), *c.mask_strides)
    consts = dict(VARLEN=lay.varlen, IDX64=idx64, **c.flags.constexprs())
    buckets = (configs.length_bucket(lay.max_q), configs.length_bucket(lay.max_k))
    _launch(_bwd_dkdv_kernel, lambda meta: (triton.cdiv(lay.max_k, meta["BLOCK_N"]) * lay.nseq * c.hk,), (
        q4, k4, v4, grad_out4, lse, delta, c.mask, c.seed, dk4, dv4, dq_acc, lay.cu_q, lay.cu_k, *strides,
        *lay.strides(dk4, 3), *lay.strides(dq_acc, 3), c.hq, c.hk, lay.max_q, lay.max_k, lay.total_q,
        lay.total_k, c.d, c.group, scale * LOG2E, scale, dropout_p, c.drop_scale, c.left, c.right,
        *buckets,
    ), dict(consts, DQ_ATOMIC=reduce, TMA=tma), autotune)
    if atomic:
        dq4.copy_(dq_acc.mul_(scale))
        return
    _launch(_bwd_dq_kernel, lambda meta: (triton.cdiv(lay.max_q, meta["BLOCK_M"]) * lay.nseq * c.hq,), (
        q4, k4, v4, grad_out4, lse, delta, c.mask, c.seed, dq4, lay.cu_q, lay.cu_k, *strides,
        *lay.strides(dq4, 3), c.hq, lay.max_q, lay.max_k, lay.total_q, lay.total_k, c.d, c.group,
        scale * LOG2E, scale, dropout_p, c.drop_scale, c.left, c.right, *buckets,
    ), consts, autotune)


def attention_fwd(q, k, v, attn_mask, seed, dropout_p, scale, window, *, autotune=None, tma=None):
    """``window``: the resolved (left, right, bounded) of genfast.ops._attention_common.window_bounds.
    ``autotune``: None follows ``autotune_enabled`` (_attention_configs.py); False takes the heuristic config (no
    benchmarking).
    ``tma``: see :func:`use_tma`."""
    c = launch_args(q, k, attn_mask, seed, dropout_p, window)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    launch_forward(q, k, v, out, lse, Layout(q, k), c, scale, dropout_p, autotune, tma)
    return out, lse


def attention_bwd(grad_out, grad_lse, q, k, v, out, lse, attn_mask, seed, dropout_p, scale, window, *, autotune=None,
                  tma=None):
    c = launch_args(q, k, attn_mask, seed, dropout_p, window)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    launch_backward(grad_out, grad_lse, q, k, v, out, lse, dq, dk, dv, Layout(q, k), c, scale, dropout_p,
                    autotune, tma)
    return dq, dk, dv


__all__ = ["attention_fwd", "attention_bwd", "launch_args", "launch_forward", "launch_backward", "LaunchArgs",
           "KernelFlags", "Layout"]
