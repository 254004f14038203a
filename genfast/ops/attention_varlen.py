"""Attention over packed variable-length sequences (FlashAttention's varlen layout), forward and backward.

``attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)``: q [total_q, Hq, D],
k and v [total_k, Hk, D] hold B sequences one after the other; sequence b owns query rows
``[cu_seqlens_q[b], cu_seqlens_q[b + 1])`` and key rows ``[cu_seqlens_k[b], cu_seqlens_k[b + 1])``
(cu_seqlens int32/int64 [B + 1], starting at 0, non-decreasing, ending at total_q / total_k).
``max_seqlen_q`` / ``max_seqlen_k`` are Python ints bounding the lengths (they size the kernels' grids).

Semantics, per sequence: exactly ``genfast.ops.attention`` on that sequence alone (the reference
``attention_varlen_ref`` below, a loop over sequences, is the specification): scale defaulting to 1/sqrt(D),
GQA when Hk divides Hq, causal and ``window=(left, right)`` aligned bottom-right *within the sequence*
(query i of a sequence with Nq_b queries and Nk_b keys sits at key position i + Nk_b - Nq_b), lse the natural
log in float32, and rows with no key to see (Nk_b = 0 included) get out 0 and lse -inf. Sequences of length 0
are allowed on either side.

Returns out [total_q, Hq, D] in q's dtype and, with ``return_lse``, lse [Hq, total_q] float32 (FlashAttention's
varlen layout: head first, as in ``attention``'s [B, Hq, Nq]).

Dropout: the element of packed query row t (of sequence b), query head h and key j *within the sequence*
(0 <= j < Nk_b) is kept iff genfast's Philox ``uniform(seed, c) >= dropout_p`` with

    c = (h * total_q + t) * max_seqlen_k + j

i.e. element (h, t, j) of a [Hq, total_q, max_seqlen_k] stream (``varlen_dropout_keep``); the seed is drawn
from ``generator``, kept probabilities are scaled by 1 / (1 - dropout_p), and lse is that of the undropped
softmax. (h * total_q + t is the row's flat index in lse. With one sequence and max_seqlen_k = Nk this is
``attention``'s counter for B = 1; the mask depends on the max_seqlen_k passed.)

Validation: checking the values of cu_seqlens (start 0, non-decreasing, last = total, lengths <= max_seqlen)
needs one host synchronisation on a GPU; ``validate=False`` skips it (torch.compile skips it too). The kernels
stay memory-safe whatever the values: cu_seqlens are clamped into [0, total] on the device, and rows no
program covers read 0 (lse -inf). The results for invalid cu_seqlens are otherwise unspecified.

Backends: CPU tensors -> the reference (the sequences gathered into a padded [B, H, max_seqlen, D] batch with a
per-sequence mask, no host sync: torch's SDPA in the input dtype, or the written-out math in fp32 when lse or
dropout is wanted); CUDA tensors -> the Triton kernels of genfast/kernels/attention.py run in their varlen mode
(custom ops ``genfast::attention_varlen_fwd_triton`` -> (out, lse), ``genfast::attention_varlen_bwd_triton``
-> (dq, dk, dv)), O(N) memory.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F

from genfast import _backend, _philox
from genfast.ops import _checks
from genfast.ops._attention_common import (
    NEG_INF,
    Knobs,
    allowed_positions,
    attention_math,
    bool_flag,
    check_qkv,
    dropout_probability,
    nan_query_rows,
    query_may_hold_nan,
    sdpa_inputs,
    softmax_scale,
    triton_supports,
    window_bounds,
    window_pair,
)
from genfast.ops.random import philox_noise

OP = "attention_varlen"
SEQLEN_DTYPES = (torch.int32, torch.int64)
# The kernels hold sequence offsets and lengths in int32 (cu_seqlens are cast to int32 for them).
MAX_ROWS = 2**31 - 1


class Packing(NamedTuple):
    """Where each sequence's rows are, in the order the custom ops' schemas take them (after q, k, v)."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int


# ------------------------------------------------------------------------------------------ reference
def varlen_dropout_keep(seed: torch.Tensor, hq: int, total_q: int, max_seqlen_k: int, dropout_p: float,
                        columns: int | None = None) -> torch.Tensor:
    """Bool [Hq, total_q, columns]: the keep mask the kernels draw (element (h, t, j) = Philox counter
    (h * total_q + t) * max_seqlen_k + j; key j counted within the row's sequence).

    ``columns`` (default max_seqlen_k) keeps only the first keys of each row: what a caller that knows the real
    sequence lengths needs, without drawing Hq x total_q x max_seqlen_k numbers. Fewer columns than max_seqlen_k
    are drawn on the host from the NumPy specification (one host read of the seed).
    """
    columns = max_seqlen_k if columns is None else columns
    if columns == max_seqlen_k or torch.compiler.is_compiling():
        numel = hq * total_q * max_seqlen_k
        keep = philox_noise(seed, numel).reshape(hq, total_q, max_seqlen_k) >= dropout_p
        return keep[:, :, :columns]
    rows = torch.arange(hq * total_q, dtype=torch.int64)[:, None] * max_seqlen_k
    counters = (rows + torch.arange(columns, dtype=torch.int64)).reshape(-1).numpy().astype("uint64")
    uniform = torch.from_numpy(_philox.uniform(int(seed.item()), counters)).reshape(hq, total_q, columns)
    return (uniform >= dropout_p).to(seed.device)


def attention_varlen_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                         cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                         dropout_p: float = 0.0, scale: float | None = None,
                         window: tuple[int | None, int | None] | None = None, return_lse: bool = False,
                         seed: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
    """The specification of :func:`attention_varlen`: a host loop running ``attention_ref``'s math on each sequence.

    Takes the arguments of ``attention_varlen`` (``seed``, an int64 one-element tensor, in place of
    ``generator``); each sequence is the [1, Hq, Nq_b, D] batch ``attention_ref`` would take, its dropout mask the
    slice of :func:`varlen_dropout_keep` that belongs to it. ``compute_dtype`` as in ``attention_ref``.
    Differentiable by ordinary autograd.
    """
    total_q, hq, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    left, right = window_pair(f"{OP}_ref", window)
    compute_dtype = compute_dtype or torch.promote_types(q.dtype, torch.float32)
    if dropout_p and seed is None:
        raise ValueError(f"{OP}_ref: dropout_p > 0 needs seed")
    keep = varlen_dropout_keep(seed, hq, total_q, max_seqlen_k, dropout_p) if dropout_p else None
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [q.new_zeros(0, hq, d)], [q.new_zeros(hq, 0, dtype=torch.float32)]
    for b in range(len(cq) - 1):
        (q0, q1), (k0, k1) = cq[b:b + 2], ck[b:b + 2]
        if q1 == q0:
            continue
        if k1 == k0:  # nothing to see: out 0, lse -inf
            outs.append(q.new_zeros(q1 - q0, hq, d))
            lses.append(torch.full((hq, q1 - q0), NEG_INF, device=q.device))
            continue
        qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q1], k[k0:k1], v[k0:k1]))  # (1, H, N_b, D)
        keep_b = keep[:, q0:q1, :k1 - k0].unsqueeze(0) if keep is not None else None
        out, lse = attention_math(qb, kb, vb, None, keep_b, causal, dropout_p, scale, left, right, compute_dtype)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out


def _padded(t: torch.Tensor, index: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Packed [total, H, D] -> padded [B, H, Nmax, D] (rows ``index`` [B, Nmax]); slots not ``valid`` set to 0.

    Keys and values past a sequence's end are zeroed (a masked key still multiplies its value by 0, and a NaN
    of another sequence must not leak in); padded query rows are masked in full and dropped afterwards, so they
    keep whatever row the clamped index reads.
    """
    if valid is not None:  # invalid slots read an appended zero row (cheaper than zeroing the padded copy)
        t = torch.cat([t, t.new_zeros((1,) + t.shape[1:])])
        index = torch.where(valid, index, t.shape[0] - 1)
    return t[index.clamp(0, t.shape[0] - 1)].transpose(1, 2)  # (B, H, Nmax, D)


def padded_lengths(packing: Packing, total_q: int, total_k: int) -> tuple[int, int]:
    """(Nq, Nk) of the padded batch the reference builds: the longest real sequences, never max_seqlen itself.

    In eager on CPU tensors the lengths are read on the host (free there); elsewhere (a CUDA tensor, which would
    need a sync, or under torch.compile, where sizes must be static) the bound is min(max_seqlen, total rows).
    Either way the memory follows the data, not the max_seqlen the caller passed (which may be a loose bound).
    """
    pad_q, pad_k = min(packing.max_q, total_q), min(packing.max_k, total_k)
    if packing.cu_q.device.type == "cpu" and not torch.compiler.is_compiling() and packing.cu_q.shape[0] > 1:
        longest = torch.stack([(cu[1:] - cu[:-1]).max() for cu in (packing.cu_q.long(), packing.cu_k.long())])
        real_q, real_k = longest.clamp(min=0).tolist()
        pad_q, pad_k = min(pad_q, real_q), min(pad_k, real_k)
    return pad_q, pad_k


# What one more SDPA call costs on a CPU, in floating-point operations of attention work (about 30 us of Python and
# dispatch at the ~30 GFLOP/s torch's CPU SDPA reaches on two cores): the price of splitting a batch into calls.
SDPA_CALL_FLOPS = 1.0e6


def cpu_path(cu_q: list[int], cu_k: list[int], heads: int, head_dim: int, causal: bool) -> str:
    """How the CPU path serves a call without dropout, lse or window: ``"per-sequence"`` (one SDPA call per
    sequence, no padding: work sum_b Nq_b * Nk_b) or ``"padded"`` (one call over the batch padded to the longest
    sequences: B * max Nq * max Nk, but one call). Whichever costs fewer operations with ``SDPA_CALL_FLOPS`` per
    call; mixed lengths make the padded batch mostly padding (uniform lengths in [1, 2m): about 3x the work),
    while many tiny sequences make the calls dominate. ``cu_q``/``cu_k``: the offsets, read on the host."""
    len_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
    len_k = [b - a for a, b in zip(cu_k, cu_k[1:])]
    if not len_q:
        return "padded"
    pair = 4.0 * heads * head_dim / (2 if causal else 1)
    per_sequence = sum(pair * nq * nk + SDPA_CALL_FLOPS for nq, nk in zip(len_q, len_k) if nq and nk)
    padded = pair * len(len_q) * max(len_q) * max(len_k) + SDPA_CALL_FLOPS
    return "per-sequence" if per_sequence < padded else "padded"


def _host_offsets(packing: Packing, total_q: int, total_k: int) -> tuple[list[int], list[int]] | None:
    """The offsets as host lists when they are valid and free to read (CPU tensors, eager), else None (then the
    padded path, which needs no host read and stays memory-safe whatever the values)."""
    if packing.cu_q.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    cu_q, cu_k = packing.cu_q.tolist(), packing.cu_k.tolist()
    for cu, total in ((cu_q, total_q), (cu_k, total_k)):
        if cu[0] != 0 or cu[-1] != total or any(b < a for a, b in zip(cu, cu[1:])):
            return None
    return cu_q, cu_k


def _per_sequence(q, k, v, cu_q: list[int], cu_k: list[int], knobs: Knobs) -> torch.Tensor:
    """One SDPA call per sequence on views of the packed rows ([1, H, N_b, D], nothing gathered), the outputs
    concatenated back into packed rows; a sequence with no key gives 0 rows. Causal is bottom-right within the
    sequence: torch's is_causal where Nq_b == Nk_b, else the mask (rows that see no key: SDPA's CPU kernel
    gives 0, the rule)."""
    hq, d = q.shape[1], q.shape[2]
    may_hold_nan = query_may_hold_nan(q)
    qs, ks, vs = sdpa_inputs(q, k, v)
    len_q = [b - a for a, b in zip(cu_q, cu_q[1:])]
    len_k = [b - a for a, b in zip(cu_k, cu_k[1:])]
    # split, not one slice per sequence: a slice's backward writes its gradient into a zero tensor of the whole
    # packed size, B of them summed (25 sequences: 15 of the 37 ms of a forward and backward, issue 26's profile);
    # split's backward concatenates the pieces once.
    outs = []
    for qb, kb, vb in zip(qs.split(len_q), ks.split(len_k), vs.split(len_k)):
        nq, nk = qb.shape[0], kb.shape[0]
        if nq == 0:
            continue
        if nk == 0:
            outs.append(qs.new_zeros(nq, hq, d))
            continue
        qb, kb, vb = (t.transpose(0, 1).unsqueeze(0) for t in (qb, kb, vb))
        square = nq == nk
        mask = allowed_positions(nq, nk, True, -1, -1, q.device) if knobs.causal and not square else None
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=knobs.causal and square,
                                             scale=knobs.scale, enable_gqa=hq != k.shape[1])
        outs.append(out[0].transpose(0, 1))
    out = torch.cat(outs) if len(outs) > 1 else outs[0].contiguous()
    return nan_query_rows(q, out if out.dtype == q.dtype else out.to(q.dtype), may_hold_nan)


def _sdpa_left_a_nan(out: torch.Tensor) -> bool:
    """True when an eager CPU call's SDPA output holds a NaN. SDPA gives NaN for a row whose visible scores are all
    -inf (an infinite query or key entry), where the specification and the kernels give 0 (no key to attend to);
    such a rare call is recomputed by the written-out math, which also keeps every genuine NaN. One read-only
    reduction to a scalar (isnan + any cost two passes and a bool tensor: 10% of a short-sequence forward); it is
    also NaN for infinities of both signs in out, a call the written-out math then serves, as rightly."""
    return out.device.type == "cpu" and not torch.compiler.is_compiling() and bool(torch.isnan(out.detach().sum()))


def _reference(q, k, v, packing: Packing, seed, knobs: Knobs, need_lse: bool, written_out: bool = False):
    """The dispatcher's reference: one SDPA call per sequence, or one padded, masked batch (``cpu_path``);
    ``written_out``: the padded batch through the written-out math (no SDPA).

    Memory is that of padded attention over the longest real sequences (B x H x Nq x Nk scores at most, see
    :func:`padded_lengths`); it is the CPU path and the ground the kernels are tested against, not the O(N) one.
    """
    total_q, hq, d = q.shape
    plain = knobs.dropout_p == 0.0 and not need_lse and knobs.window_left < 0 and knobs.window_right < 0
    offsets = _host_offsets(packing, total_q, k.shape[0]) if plain and total_q and not written_out else None
    if offsets is not None and cpu_path(*offsets, hq, d, knobs.causal) == "per-sequence":
        out = _per_sequence(q, k, v, *offsets, knobs)
        if _sdpa_left_a_nan(out):
            return _reference(q, k, v, packing, seed, knobs, need_lse, written_out=True)
        return out, None
    cu_q, cu_k = packing.cu_q.long(), packing.cu_k.long()
    nseq = cu_q.shape[0] - 1
    max_q, max_k = padded_lengths(packing, total_q, k.shape[0])
    if nseq == 0 or max_q == 0 or max_k == 0:
        return q.new_zeros(q.shape), torch.full((hq, total_q), NEG_INF, device=q.device)
    scale, dropout_p = knobs.scale, knobs.dropout_p
    left, right, bounded = window_bounds(knobs.causal, knobs.window_left, knobs.window_right, total_q, k.shape[0])
    len_q, len_k = cu_q[1:] - cu_q[:-1], cu_k[1:] - cu_k[:-1]  # (B,)
    i = torch.arange(max_q, device=q.device)
    j = torch.arange(max_k, device=q.device)
    valid_q, valid_k = i < len_q[:, None], j < len_k[:, None]  # (B, max_q), (B, max_k)
    index_q, index_k = cu_q[:-1, None] + i, cu_k[:-1, None] + j
    qp, kp, vp = _padded(q, index_q, None), _padded(k, index_k, valid_k), _padded(v, index_k, valid_k)
    # Positions aligned bottom-right within each sequence: query i sits at key position i + Nk_b - Nq_b, and sees
    # keys [first, last] (the window's edges, the causal limit and the sequence's keys).
    pos = i + (len_k - len_q)[:, None]  # (B, max_q)
    first = (pos - left).clamp(min=0)
    last = torch.minimum(len_k[:, None] - 1, pos + right)
    mask = ((j >= first[:, :, None]) & (j <= last[:, :, None]) & valid_q[:, :, None])[:, None]  # (B, 1, max_q, max_k)
    if dropout_p == 0.0 and not need_lse and not written_out:
        # torch's fused kernel (in the input dtype but where sdpa_inputs says otherwise); rows with no visible key
        # are set to 0 below, whatever SDPA gives. Padded query rows are dropped below, so with neither causal nor a
        # window the key-padding mask alone is exact (every real query sees every real key of its sequence).
        if not bounded and offsets is not None:
            mask = valid_k[:, None, None, :]
        may_hold_nan = query_may_hold_nan(qp)
        out = F.scaled_dot_product_attention(*sdpa_inputs(qp, kp, vp), attn_mask=mask, scale=scale,
                                             enable_gqa=hq != k.shape[1])
        out = nan_query_rows(qp, out if out.dtype == q.dtype else out.to(q.dtype), may_hold_nan)
        if _sdpa_left_a_nan(out):
            return _reference(q, k, v, packing, seed, knobs, need_lse, written_out=True)
        lse = None
    else:
        keep = None
        if dropout_p:
            keep = varlen_dropout_keep(seed, hq, total_q, packing.max_k, dropout_p, columns=max_k)
            keep = keep[:, index_q.clamp(0, total_q - 1)].transpose(0, 1)  # (B, Hq, max_q, max_k)
        out, lse = attention_math(qp, kp, vp, mask, keep, False, dropout_p, scale, -1, -1,
                         torch.promote_types(q.dtype, torch.float32))
    # Back to packed rows: row t belongs to sequence b(t), at index t - cu_q[b(t)] within it.
    t = torch.arange(total_q, device=q.device)
    b_of = torch.searchsorted(cu_q[1:], t, right=True).clamp(max=nseq - 1)
    i_of = t - cu_q[b_of]
    covered = (i_of >= 0) & (i_of < max_q)
    i_of = i_of.clamp(0, max_q - 1)
    sees = covered & (first[b_of, i_of] <= last[b_of, i_of])  # (total_q,)
    out = torch.where(sees[:, None, None], out.transpose(1, 2)[b_of, i_of], 0.0)  # (total_q, Hq, D)
    if lse is not None:
        lse = torch.where(sees, lse.transpose(1, 2)[b_of, i_of].transpose(0, 1), NEG_INF)  # (Hq, total_q)
    return out, lse


# ------------------------------------------------------------------------------------------ Triton custom ops
# The schemas are flat (torch.library takes no records): q, k, v, the Packing fields, seed, the Knobs fields.
N_INPUTS_BEFORE_KNOBS = 3 + len(Packing._fields) + 1


def _fwd_fake(q, k, v, *packing_seed_knobs):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


def _bwd_fake(grad_out, grad_lse, q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("genfast::attention_varlen_fwd_triton", mutates_args=())
def _attention_varlen_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                                 cu_k: torch.Tensor, max_q: int, max_k: int, seed: torch.Tensor | None, causal: bool,
                                 dropout_p: float, scale: float, window_left: int,
                                 window_right: int) -> tuple[torch.Tensor, torch.Tensor]:
    from genfast.kernels import attention_varlen as kernels

    window = window_bounds(causal, window_left, window_right, q.shape[0], k.shape[0])
    return kernels.attention_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, seed, dropout_p, scale, window)


@torch.library.custom_op("genfast::attention_varlen_bwd_triton", mutates_args=())
def _attention_varlen_bwd_triton(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor,
                                 k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                 cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int,
                                 seed: torch.Tensor | None, causal: bool, dropout_p: float, scale: float,
                                 window_left: int,
                                 window_right: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from genfast.kernels import attention_varlen as kernels

    window = window_bounds(causal, window_left, window_right, q.shape[0], k.shape[0])
    return kernels.attention_varlen_bwd(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, seed,
                                        dropout_p, scale, window)


_attention_varlen_fwd_triton.register_fake(_fwd_fake)
_attention_varlen_bwd_triton.register_fake(_bwd_fake)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    packing = Packing(*inputs[3:3 + len(Packing._fields)])
    seed = inputs[N_INPUTS_BEFORE_KNOBS - 1]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, packing.cu_q, packing.cu_k, seed)
    ctx.max_lengths = (packing.max_q, packing.max_k)
    ctx.knobs = Knobs(*inputs[N_INPUTS_BEFORE_KNOBS:])


def _fwd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_q, cu_k, seed = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    # As in attention: a gradient of lse is exact (d lse_i / d s_ij = P_ij), folded into the backward's delta.
    dq, dk, dv = torch.ops.genfast.attention_varlen_bwd_triton(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k,
                                                               *ctx.max_lengths, seed, *ctx.knobs)
    return (dq, dk, dv) + (None,) * (N_INPUTS_BEFORE_KNOBS - 3 + len(Knobs._fields))


_attention_varlen_fwd_triton.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ------------------------------------------------------------------------------------------ dispatch
def _triton_fwd(q, k, v, packing: Packing, seed, knobs: Knobs, need_lse: bool):
    # max_seqlen sizes the kernels' grids, and a loose bound (up to 2**31 - 1 is legal) would launch programs that
    # only exit: no sequence is longer than its tensor's rows. max_seqlen_k also strides the dropout counter, so
    # it is kept as given when dropout is on.
    packing = packing._replace(max_q=min(packing.max_q, q.shape[0]),
                               max_k=packing.max_k if knobs.dropout_p else min(packing.max_k, k.shape[0]))
    return torch.ops.genfast.attention_varlen_fwd_triton(q, k, v, *packing, seed, *knobs)


_dispatch = _backend.dispatcher(OP, _reference, preference={"cuda": ("triton",), "cpu": ()})
_dispatch.register("triton", supports=triton_supports)(_triton_fwd)


# ------------------------------------------------------------------------------------------ checks
def _check_cu(name: str, cu, device: torch.device) -> None:
    _checks.tensor(OP, name, cu, dtypes=SEQLEN_DTYPES, ndim=1)
    if cu.shape[0] == 0:
        raise ValueError(f"{OP}: {name} must hold B + 1 offsets (at least the leading 0), got an empty tensor")
    if cu.device != device:
        raise ValueError(f"{OP}: {name} is on {cu.device} but q is on {device}")


def _max_seqlen(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{OP}: {name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{OP}: {name} must be >= 0, got {value}")
    if value > MAX_ROWS:
        # The kernels hold lengths in int32 and size their grids from it: a larger bound is no sequence's length.
        raise ValueError(f"{OP}: {name} must be <= 2**31 - 1, got {value}")
    return int(value)


def _check_cu_values(cu_q, cu_k, total_q: int, total_k: int, max_q: int, max_k: int) -> None:
    """cu_seqlens start at 0, never decrease, end at the totals, and no length passes max_seqlen: one host sync."""
    stats = []
    for cu in (cu_q, cu_k):
        cu = cu.long()
        lengths = cu[1:] - cu[:-1]
        if lengths.numel() == 0:
            lengths = cu.new_zeros(1)
        stats += [cu[0], cu[-1], lengths.min(), lengths.max()]
    values = torch.stack(stats).tolist()
    for name, total, max_name, max_len, (first, last, shortest, longest) in (
            ("cu_seqlens_q", total_q, "max_seqlen_q", max_q, values[:4]),
            ("cu_seqlens_k", total_k, "max_seqlen_k", max_k, values[4:])):
        tensor = "q" if name.endswith("q") else "k"
        if first != 0:
            raise ValueError(f"{OP}: {name} must start at 0, got {name}[0] = {first}")
        if shortest < 0:
            raise ValueError(f"{OP}: {name} must be non-decreasing (a sequence length would be {shortest})")
        if last != total:
            raise ValueError(f"{OP}: {name}[-1] = {last} must equal the number of packed rows of {tensor} ({total})")
        if longest > max_len:
            raise ValueError(f"{OP}: a sequence of {name} has length {longest} > {max_name} = {max_len}")


# ------------------------------------------------------------------------------------------ public op
def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     dropout_p: float = 0.0, scale: float | None = None,
                     window: tuple[int | None, int | None] | None = None, return_lse: bool = False,
                     generator: torch.Generator | None = None, validate: bool = True):
    """Attention over packed variable-length sequences, fused: O(N) memory, differentiable in q, k and v.

    q [total_q, Hq, D]; k, v [total_k, Hk, D] with Hk dividing Hq; one float dtype (fp32/fp16/bf16) and device.
    cu_seqlens_q, cu_seqlens_k: int32/int64 [B + 1] offsets of each sequence's rows (0, ..., total);
    max_seqlen_q, max_seqlen_k: ints >= every sequence's length. ``causal`` and ``window=(left, right)`` are
    aligned bottom-right within each sequence; ``dropout_p`` in [0, 1), seeded from ``generator``; ``scale``
    defaults to 1/sqrt(D). ``validate`` checks the cu_seqlens values (one host sync; see the module docstring).
    Returns out [total_q, Hq, D] in q's dtype, and with ``return_lse`` also lse [Hq, total_q] float32.
    """
    check_qkv(OP, q, k, v, layout="[total, H, D]")
    for name, t in (("q", q), ("k", k)):
        if t.shape[0] > MAX_ROWS:
            raise ValueError(f"{OP}: {name} holds {t.shape[0]} packed rows; the kernels take at most 2**31 - 1")
    _check_cu("cu_seqlens_q", cu_seqlens_q, q.device)
    _check_cu("cu_seqlens_k", cu_seqlens_k, q.device)
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        raise ValueError(f"{OP}: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]} offsets")
    max_q = _max_seqlen("max_seqlen_q", max_seqlen_q)
    max_k = _max_seqlen("max_seqlen_k", max_seqlen_k)
    causal = bool_flag(OP, "causal", causal)
    return_lse = bool_flag(OP, "return_lse", return_lse)
    validate = bool_flag(OP, "validate", validate)
    dropout_p = dropout_probability(OP, dropout_p)
    scale = softmax_scale(OP, scale, q.shape[-1])
    left, right = window_pair(OP, window)
    _checks.generator(OP, generator, q.device)
    if dropout_p > 0 and q.shape[1] * q.shape[0] * max_k > 2**63 - 1:
        raise ValueError(f"{OP}: with dropout, Hq * total_q * max_seqlen_k must stay below 2**63 (the Philox "
                         f"counter), got {q.shape[1]} * {q.shape[0]} * {max_k}")
    if validate and not torch.compiler.is_compiling():
        _check_cu_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], max_q, max_k)
    seed = _checks.draw_seed(generator, q.device) if dropout_p > 0 else None
    packing = Packing(cu_seqlens_q, cu_seqlens_k, max_q, max_k)
    knobs = Knobs(causal, dropout_p, scale, left, right)
    out, lse = _dispatch(q, k, v, packing, seed, knobs, return_lse, device=q.device, dtype=q.dtype,
                         facts={"head_dim": q.shape[-1]})
    return (out, lse) if return_lse else out


__all__ = ["attention_varlen", "attention_varlen_ref", "varlen_dropout_keep"]
