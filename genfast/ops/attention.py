"""Fused scaled dot-product attention: forward, backward, masks, GQA, sliding windows, seeded dropout.

``attention(q, k, v)`` takes torch's ``scaled_dot_product_attention`` layout: q [B, Hq, Nq, D], k and v
[B, Hk, Nk, D]. Semantics (the reference ``attention_ref`` below is the specification):

- scores ``s[b, h, i, j] = scale * q[b, h, i] . k[b, h // (Hq // Hk), j]`` (GQA/MQA when Hk divides Hq),
  ``scale`` defaulting to ``1 / sqrt(D)``; an additive ``attn_mask`` is added to s, a boolean one keeps
  the positions where it is True (as in torch); it broadcasts to [B, Hq, Nq, Nk].
- positions: query i sits at key position ``p_i = i + Nk - Nq`` (aligned bottom-right, as FlashAttention-2
  does for cross-attention). ``causal`` keeps keys ``j <= p_i``; ``window=(left, right)`` keeps
  ``p_i - left <= j <= p_i + right`` (None or -1: unbounded on that side). With Nq == Nk, causal is torch's.
- ``lse[b, h, i] = logsumexp_j s`` (natural log, float32) over the kept positions; a row with no kept
  position gets output 0 and lse -inf (torch's SDPA also returns 0 there).
- dropout: ``P = softmax(s)``; element (b, h, i, j) is kept iff genfast's Philox ``uniform(seed, c) >=
  dropout_p`` with ``c = ((b * Hq + h) * Nq + i) * Nk + j`` and a seed drawn from ``generator``; kept
  probabilities are scaled by ``1 / (1 - dropout_p)``, as torch does. lse is that of the undropped P.

Backends: on CPU tensors the reference path: torch's SDPA in the input dtype (in fp32 when a half-precision call
needs gradients on a CPU without native half matmuls) where SDPA has every feature the call uses, else the
written-out math in fp32 (``attention_ref``, the specification, is always the latter); on CUDA tensors the
Triton kernels of genfast/kernels/attention.py (custom ops ``genfast::attention_fwd_triton`` -> (out, lse) and
``genfast::attention_bwd_triton`` -> (dq, dk, dv)).

What attention_varlen and attention_decode share with this op (``Knobs``, the argument checks, the window rule,
the written-out math) lives in genfast/ops/_attention_common.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from genfast import _backend
from genfast.ops import _checks
from genfast.ops._attention_common import (
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

OP = "attention"


# ------------------------------------------------------------------------------------------ reference
def dropout_keep(seed: torch.Tensor, shape: tuple[int, int, int, int], dropout_p: float) -> torch.Tensor:
    """Bool [B, Hq, Nq, Nk]: the dropout keep mask the kernels draw for ``seed`` (flat index = Philox counter)."""
    numel = math.prod(shape)
    return philox_noise(seed, numel).reshape(shape) >= dropout_p


def _sdpa_serves(q, k, attn_mask, knobs: Knobs, need_lse: bool) -> bool:
    """True when torch's SDPA has every feature this call uses (and our semantics for it)."""
    return (knobs.dropout_p == 0.0 and not need_lse and knobs.window_left < 0 and knobs.window_right < 0
            and (not knobs.causal or (q.shape[2] == k.shape[2] and attn_mask is None))
            and (attn_mask is None or attn_mask.dtype == torch.bool))


def _unbroadcast(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``mask`` with its broadcast (stride-0) dims back to size 1. SDPA broadcasts a mask itself, and its CPU kernel
    turns a bool mask into a float one at the size it is given: the [B, Hq, Nq, Nk] view cost Hq times the
    [B, 1, Nq, Nk] pass transformers' own "sdpa" pays (the transformers backend, left-padded, issue 26)."""
    if mask is None:
        return None
    for dim in range(mask.dim()):
        if mask.stride(dim) == 0 and mask.shape[dim] > 1:
            mask = mask.narrow(dim, 0, 1)
    return mask


def _reference(q, k, v, attn_mask, seed, knobs: Knobs, need_lse: bool, compute_dtype=None):
    """The dispatcher's reference: (out, lse or None), differentiable by ordinary autograd."""
    if _sdpa_serves(q, k, attn_mask, knobs, need_lse):
        # Same semantics, torch's fused kernel (it accumulates in fp32 inside): what lets auto keep up with SDPA on
        # CPU. It runs in the input dtype but where sdpa_inputs says otherwise.
        may_hold_nan = query_may_hold_nan(q)
        qs, ks, vs = sdpa_inputs(q, k, v)
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=_unbroadcast(attn_mask), is_causal=knobs.causal,
                                             scale=knobs.scale, enable_gqa=q.shape[1] != k.shape[1])
        return nan_query_rows(q, out if out.dtype == q.dtype else out.to(q.dtype), may_hold_nan), None
    compute_dtype = compute_dtype or torch.promote_types(q.dtype, torch.float32)
    keep = dropout_keep(seed, mask_shape(q, k), knobs.dropout_p) if knobs.dropout_p else None
    return attention_math(q, k, v, attn_mask, keep, *knobs, compute_dtype)


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, scale: float | None = None,
                  window: tuple[int | None, int | None] | None = None, return_lse: bool = False,
                  seed: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None):
    """The specification of :func:`attention`, plain PyTorch in fp32 (or ``compute_dtype``).

    Takes the arguments of ``attention`` (``seed``, an int64 one-element tensor, in place of ``generator``:
    the dropout keep mask is the kernels' one, :func:`dropout_keep`). ``compute_dtype`` (default: fp32, fp64
    for fp64 inputs) is what the tests use to measure torch's own error in a low precision.
    """
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    left, right = window_pair(OP, window)
    mask = _broadcast_mask(attn_mask, q, k)
    if dropout_p and seed is None:
        raise ValueError(f"{OP}_ref: dropout_p > 0 needs seed")
    keep = dropout_keep(seed, mask_shape(q, k), dropout_p) if dropout_p else None
    out, lse = attention_math(q, k, v, mask, keep, causal, dropout_p, scale, left, right,
                              compute_dtype or torch.promote_types(q.dtype, torch.float32))
    return (out, lse) if return_lse else out


def mask_shape(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int]:
    return (q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _broadcast_mask(attn_mask, q, k):
    """``attn_mask`` viewed as [B, Hq, Nq, Nk] (stride 0 along broadcast dims, nothing copied)."""
    if attn_mask is None:
        return None
    shape = mask_shape(q, k)
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)).expand(shape)


# ------------------------------------------------------------------------------------------ Triton custom ops
# The schemas are flat (torch.library takes no records): q, k, v, attn_mask, seed, then the Knobs fields.
N_TENSOR_INPUTS = 5  # q, k, v, attn_mask, seed


def _fwd_fake(q, k, v, attn_mask, seed, *knobs):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


def _bwd_fake(grad_out, grad_lse, q, k, v, out, lse, attn_mask, seed, *knobs):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.custom_op("genfast::attention_fwd_triton", mutates_args=())
def _attention_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                          seed: torch.Tensor | None, causal: bool, dropout_p: float, scale: float, window_left: int,
                          window_right: int) -> tuple[torch.Tensor, torch.Tensor]:
    from genfast.kernels import attention as kernels

    window = window_bounds(causal, window_left, window_right, q.shape[2], k.shape[2])
    return kernels.attention_fwd(q, k, v, attn_mask, seed, dropout_p, scale, window)


@torch.library.custom_op("genfast::attention_bwd_triton", mutates_args=())
def _attention_bwd_triton(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                          v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, attn_mask: torch.Tensor | None,
                          seed: torch.Tensor | None, causal: bool, dropout_p: float, scale: float, window_left: int,
                          window_right: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from genfast.kernels import attention as kernels

    window = window_bounds(causal, window_left, window_right, q.shape[2], k.shape[2])
    return kernels.attention_bwd(grad_out, grad_lse, q, k, v, out, lse, attn_mask, seed, dropout_p, scale, window)


_attention_fwd_triton.register_fake(_fwd_fake)
_attention_bwd_triton.register_fake(_bwd_fake)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, attn_mask, seed = inputs[:N_TENSOR_INPUTS]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, attn_mask, seed)
    ctx.knobs = Knobs(*inputs[N_TENSOR_INPUTS:])


def _fwd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, attn_mask, seed = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    # A gradient of lse is exact, not ignored: d lse_i / d s_ij = P_ij, folded into the backward's delta.
    dq, dk, dv = torch.ops.genfast.attention_bwd_triton(grad_out, grad_lse, q, k, v, out, lse, attn_mask, seed,
                                                        *ctx.knobs)
    return (dq, dk, dv) + (None,) * (N_TENSOR_INPUTS - 3 + len(Knobs._fields))


_attention_fwd_triton.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


# ------------------------------------------------------------------------------------------ dispatch
def _triton_fwd(q, k, v, attn_mask, seed, knobs: Knobs, need_lse: bool):
    return torch.ops.genfast.attention_fwd_triton(q, k, v, attn_mask, seed, *knobs)


_dispatch = _backend.dispatcher(OP, _reference, preference={"cuda": ("triton",), "cpu": ()})
_dispatch.register("triton", supports=triton_supports)(_triton_fwd)


# ------------------------------------------------------------------------------------------ checks
def _check_mask(op: str, attn_mask, q, k) -> None:
    if attn_mask is None:
        return
    _checks.tensor(op, "attn_mask", attn_mask, dtypes=(torch.bool,) + _checks.FLOAT_DTYPES)
    _checks.same_device(op, "q", q, attn_mask=attn_mask)
    target = mask_shape(q, k)
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() > 4 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
        raise ValueError(f"{op}: attn_mask of shape {shape} does not broadcast to [B, Hq, Nq, Nk] = {list(target)}")
    if attn_mask.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{op}: attn_mask must not require grad (no gradient is computed for the mask)")


# ------------------------------------------------------------------------------------------ public op
def _everyday(q, k, v, causal, attn_mask, dropout_p, scale, window, return_lse, generator) -> bool:
    """True for the everyday call that is valid by inspection: q, k, v plain 4-D tensors of one float dtype and
    device that ``check_qkv`` would pass, no mask, dropout, window or generator, a float scale or none (what the
    transformers and diffusers doors pass). Such a call skips the checks below (about 5 us of Python, more than
    SDPA's own 4 us per call on tiny inputs; this test costs 2 us); any other call, valid or not, takes them, so
    every error still comes from them and names the argument."""
    return (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
            and attn_mask is None and window is None and generator is None
            and (scale is None or scale.__class__ is float and math.isfinite(scale))
            and dropout_p.__class__ in (float, int) and dropout_p == 0
            and causal.__class__ is bool and return_lse.__class__ is bool
            and q.dtype in _checks.FLOAT_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and q.dim() == 4 and k.dim() == 4 and k.shape == v.shape and q.device == k.device == v.device
            and q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3] and q.shape[3] > 0 and k.shape[2] > 0
            and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, scale: float | None = None,
              window: tuple[int | None, int | None] | None = None, return_lse: bool = False,
              generator: torch.Generator | None = None):
    """Scaled dot-product attention, fused: O(N) memory, differentiable in q, k and v.

    q [B, Hq, Nq, D]; k, v [B, Hk, Nk, D] with Hk dividing Hq; one float dtype (fp32/fp16/bf16) and device.
    ``attn_mask``: bool (True = attend) or float (added to the scores), broadcastable to [B, Hq, Nq, Nk];
    ``causal`` and ``window=(left, right)`` are aligned bottom-right (see the module docstring);
    ``dropout_p`` in [0, 1), seeded from ``generator``; ``scale`` defaults to 1/sqrt(D).
    Returns out [B, Hq, Nq, D] in q's dtype, and with ``return_lse`` also lse [B, Hq, Nq] float32
    (differentiable too).
    """
    if _everyday(q, k, v, causal, attn_mask, dropout_p, scale, window, return_lse, generator):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        seed, mask, knobs = None, None, Knobs(causal, 0.0, scale, -1, -1)
    else:
        check_qkv(OP, q, k, v)
        causal = bool_flag(OP, "causal", causal)
        return_lse = bool_flag(OP, "return_lse", return_lse)
        _check_mask(OP, attn_mask, q, k)
        dropout_p = dropout_probability(OP, dropout_p)
        scale = softmax_scale(OP, scale, q.shape[-1])
        left, right = window_pair(OP, window)
        _checks.generator(OP, generator, q.device)
        seed = _checks.draw_seed(generator, q.device) if dropout_p > 0 else None
        mask = _broadcast_mask(attn_mask, q, k)
        knobs = Knobs(causal, dropout_p, scale, left, right)
    out, lse = _dispatch(q, k, v, mask, seed, knobs, return_lse, device=q.device, dtype=q.dtype,
                         facts={"head_dim": q.shape[-1]})
    return (out, lse) if return_lse else out


__all__ = ["attention", "attention_ref", "allowed_positions", "dropout_keep", "Knobs"]
