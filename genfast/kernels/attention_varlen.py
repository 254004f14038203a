"""Triton launchers of genfast::attention_varlen_fwd_triton / attention_varlen_bwd_triton (packed sequences).

The kernels are genfast/kernels/attention.py's, compiled with ``VARLEN=True``: the same FlashAttention-2 tile
loops, online softmax in base 2, causal/window runs and backward (delta, dK/dV per key tile over the GQA
group, dQ per query tile). What changes is where a program finds its sequence: program (tile, b * H + h)
reads ``cu_seqlens[b]`` and ``cu_seqlens[b + 1]``, works on packed rows [cu[b], cu[b + 1]) of the
[total, H, D] tensors, and exits at once when its tile starts past the sequence's length. The grid is sized
for ``max_seqlen``; nothing of size N x N is ever stored.

lse is [Hq, total_q] (FlashAttention's varlen layout), i.e. the padded kernels' [B, Hq, Nq] layout with B = 1
and Nq = total_q, so the delta kernel runs on it unchanged.

The outputs and gradients start zeroed: with checked cu_seqlens every row belongs to exactly one sequence and
is written by the kernels, and with unchecked ones (``validate=False``) a row no program covers reads 0
rather than uninitialised memory. cu_seqlens values are clamped into [0, total] in the kernels, so no value
makes them read or write out of bounds.
"""

from __future__ import annotations

import torch

from genfast.kernels.attention import Layout, launch_args, launch_backward, launch_forward, packed_view


def _nothing_to_do(q, k, cu_q, max_q, max_k) -> bool:
    """No sequence, no query row, or no key anywhere: the zero-filled outputs are already the answer."""
    return cu_q.shape[0] <= 1 or q.shape[0] == 0 or k.shape[0] == 0 or max_q == 0 or max_k == 0


def attention_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, seed, dropout_p, scale, window):
    """q [total_q, Hq, D], k/v [total_k, Hk, D] -> out [total_q, Hq, D], lse [Hq, total_q] float32. ``window``: the
    (left, right, bounded) that genfast.ops._attention_common.window_bounds resolved for total_q and total_k."""
    total_q, hq, _ = q.shape
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((hq, total_q), float("-inf"), dtype=torch.float32, device=q.device)
    if _nothing_to_do(q, k, cu_q, max_q, max_k):
        return out, lse
    q4, k4, v4 = packed_view(q), packed_view(k), packed_view(v)
    c = launch_args(q4, k4, None, seed, dropout_p, window)
    lay = Layout(q4, k4, cu_q.to(torch.int32).contiguous(), cu_k.to(torch.int32).contiguous(), max_q, max_k)
    launch_forward(q4, k4, v4, packed_view(out), lse, lay, c, scale, dropout_p)
    return out, lse


def attention_varlen_bwd(grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, seed, dropout_p, scale,
                         window):
    """dq [total_q, Hq, D], dk and dv [total_k, Hk, D] from the forward's out and lse."""
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    if _nothing_to_do(q, k, cu_q, max_q, max_k):
        return dq, dk, dv
    q4, k4, v4 = packed_view(q), packed_view(k), packed_view(v)
    c = launch_args(q4, k4, None, seed, dropout_p, window)
    lay = Layout(q4, k4, cu_q.to(torch.int32).contiguous(), cu_k.to(torch.int32).contiguous(), max_q, max_k)
    launch_backward(packed_view(grad_out), grad_lse, q4, k4, v4, packed_view(out), lse, packed_view(dq),
                    packed_view(dk), packed_view(dv), lay, c, scale, dropout_p)
    return dq, dk, dv


__all__ = ["attention_varlen_fwd", "attention_varlen_bwd"]
