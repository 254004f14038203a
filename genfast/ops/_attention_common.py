"""What the attention ops (attention, attention_varlen, attention_decode) share, written once.

- ``Knobs``: the checked scalar options of one call, as the custom ops' schemas take them;
- the argument checks every attention op runs (``check_qkv``, ``bool_flag``, ``softmax_scale``,
  ``dropout_probability``, ``window_pair``), with the vocabulary of genfast/ops/_checks.py;
- the window rule: :func:`window_bounds` turns ``causal`` and ``window=(left, right)`` into the two distances every
  kernel (Triton, C++ CPU, CUDA) and every reference mask reads, so no backend re-derives them;
- the math the references write out (``attention_math``, ``allowed_positions``) and what the CPU reference paths
  hand torch's SDPA (``sdpa_inputs``, ``query_may_hold_nan``, ``nan_query_rows``);
- the Triton kernels' one support check (``triton_supports``).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from genfast.ops import _checks

NEG_INF = float("-inf")
TRITON_MAX_HEAD_DIM = 256


class Knobs(NamedTuple):
    """The checked scalar options of one attention call, in the order the custom ops' schemas take them.

    One record carries them from the public op through the dispatcher, the backends and the autograd context;
    it is unpacked (``*knobs``) only where a flat schema needs it: the custom ops and the Triton launchers.
    """

    causal: bool
    dropout_p: float
    scale: float
    window_left: int  # -1: unbounded
    window_right: int  # -1: unbounded


# ------------------------------------------------------------------------------------------ checks
def _window_side(op: str, name: str, value) -> int:
    if value is None:
        return -1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int >= 0, -1 or None, got {type(value).__name__}")
    if value < -1:
        raise ValueError(f"{op}: {name} must be an int >= 0, -1 or None (unbounded), got {value}")
    return int(value)


def window_pair(op: str, window) -> tuple[int, int]:
    """(left, right) with -1 for an unbounded side."""
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"{op}: window must be None or a pair (left, right), got {window!r}")
    return _window_side(op, "window[0] (left)", window[0]), _window_side(op, "window[1] (right)", window[1])


def bool_flag(op: str, name: str, value) -> bool:
    """``value`` if it is a bool (not merely truthy), else a TypeError naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def check_qkv(op: str, q, k, v, layout: str = "[B, H, N, D]") -> None:
    """q, k, v of one float dtype and device, k and v of one shape, one head dim >= 1, Hk dividing Hq.

    ``layout`` names the dims: "[B, H, N, D]" (attention: batch and key count checked too) or "[total, H, D]"
    (attention_varlen's packed rows).
    """
    ndim = layout.count(",") + 1
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(op, name, t, dtypes=_checks.FLOAT_DTYPES, ndim=ndim)
    _checks.same_device(op, "q", q, k=k, v=v)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but q has dtype {q.dtype}")
    _checks.same_shape(op, "k", k, v=v)
    hq, d, hk, dk = q.shape[-2 if ndim == 3 else 1], q.shape[-1], k.shape[-2 if ndim == 3 else 1], k.shape[-1]
    if ndim == 4 and k.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: k has batch {k.shape[0]} but q has batch {q.shape[0]} (q {layout}, k {layout})")
    if dk != d:
        raise ValueError(f"{op}: q and k head dims differ: q has D={d}, k has D={dk} (q {layout}, k {layout})")
    if d == 0:
        raise ValueError(f"{op}: the head dim D must be >= 1, got q shape {tuple(q.shape)}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"{op}: the number of query heads Hq={hq} must be a multiple of the key heads Hk={hk}")
    if ndim == 4 and k.shape[2] == 0:
        raise ValueError(f"{op}: k and v must hold at least one key (Nk >= 1), got k shape {tuple(k.shape)}")


def softmax_scale(op: str, scale, head_dim: int) -> float:
    """``scale`` checked (a finite real number), or 1 / sqrt(head_dim) when None."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = _checks.real_number(op, "scale", scale)
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    return scale


def dropout_probability(op: str, dropout_p) -> float:
    """``dropout_p`` checked: a real number in [0, 1)."""
    dropout_p = _checks.real_number(op, "dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_p


# ------------------------------------------------------------------------------------------ window rule
class WindowBounds(NamedTuple):
    """The keys a query may see, resolved: the query at key position ``p`` sees key ``j`` iff
    ``p - left <= j <= p + right`` (and ``0 <= j <`` the sequence's length). Both are >= 0."""

    left: int
    right: int
    bounded: bool  # some side cuts some row's keys (causal or a window): the Triton kernels tune for it apart


def window_bounds(causal: bool, window_left: int, window_right: int, nq: int, nk: int) -> WindowBounds:
    """The window rule: ``causal`` and the checked window sides (-1: unbounded) as the distances the kernels use.

    ``nq`` query rows and ``nk`` key slots (for packed sequences, the totals; for a KV cache, its capacity Nmax):
    queries sit at key positions in [nk - nq, nk) bottom-right aligned (a cache's, in [L - nq, L) with L <= nk), so
    no query is ``nq + nk`` or more from a key. An unbounded side becomes that distance plus one (``far``), and a
    side given wider than that is cut to it, which changes no row and keeps the kernels' index arithmetic small;
    causal is a right side of 0. The comparisons against ``far`` run only for a given window side, so the usual
    call (no window) traced by torch.compile with symbolic sizes adds no guard.
    """
    far = nq + nk + 1
    left = far if window_left < 0 else min(window_left, far)
    right = 0 if causal else far if window_right < 0 else min(window_right, far)
    bounded = causal or (0 <= window_left < far) or (0 <= window_right < far)
    return WindowBounds(left, right, bounded)


# ------------------------------------------------------------------------------------------ math
def allowed_positions(nq: int, nk: int, causal: bool, window_left: int, window_right: int,
                      device: torch.device | None = None) -> torch.Tensor | None:
    """Bool [Nq, Nk]: True where query i may see key j (bottom-right aligned); None when all may."""
    if not causal and window_left < 0 and window_right < 0:
        return None
    left, right, _ = window_bounds(causal, window_left, window_right, nq, nk)
    pos = torch.arange(nq, device=device)[:, None] + (nk - nq)
    j = torch.arange(nk, device=device)[None, :]
    return (j >= pos - left) & (j <= pos + right)


def attention_math(q, k, v, attn_mask, keep, causal, dropout_p, scale, window_left, window_right, compute_dtype):
    """The attention math written out in ``compute_dtype``; returns (out in q's dtype, lse float32)."""
    b, hq, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    qc, kc, vc = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    if hq != hk:  # GQA: query head h reads key/value head h // (Hq // Hk)
        kc, vc = kc.repeat_interleave(hq // hk, dim=1), vc.repeat_interleave(hq // hk, dim=1)
    s = (qc @ kc.transpose(-1, -2)) * scale  # (B, Hq, Nq, Nk)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, NEG_INF) if attn_mask.dtype == torch.bool else s + attn_mask.to(compute_dtype)
    ok = allowed_positions(nq, nk, causal, window_left, window_right, q.device)
    if ok is not None:
        s = s.masked_fill(~ok, NEG_INF)
    # Softmax written out so that rows with no kept position give 0 (not NaN) in the forward and the backward:
    # the shift m is a constant (softmax does not depend on it) and 0 where the whole row is -inf.
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(m == NEG_INF, torch.zeros_like(m), m)
    e = torch.exp(s - m)
    total = e.sum(dim=-1, keepdim=True)
    # "!= 0", not "> 0": a NaN score (a NaN in q or in a key the row sees) must come out as NaN, not as an empty row.
    nonempty = total != 0
    p = e / torch.where(nonempty, total, torch.ones_like(total))
    lse = torch.where(nonempty, m + torch.log(torch.where(nonempty, total, torch.ones_like(total))), NEG_INF)
    if keep is not None:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    out = p @ vc
    return out.to(q.dtype), lse.squeeze(-1).float()


def _half_dtypes_without_native_cpu_matmul() -> frozenset[torch.dtype]:
    """bf16/fp16 where this CPU's oneDNN has no native instructions for them (AVX2 parts, for example).

    There torch's SDPA backward in half precision is emulated: bf16 d64 B8 H8 N256 took 164 ms against 33 ms in
    fp32 on an AVX2 EPYC (benchmarks/results/history/cpu-x86-64-x2-threads-20261129-1f31844.md), while the two forwards
    cost about the same. On CPUs with AVX512-BF16 or AMX the half kernels are the fast ones. Probed once, at
    import: torch.compile cannot trace the probes.
    """
    probes = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
    slow = set()
    for dtype, name in probes.items():
        probe = getattr(torch.ops.mkldnn, name, None)
        try:
            if probe is not None and not bool(probe()):
                slow.add(dtype)
        except RuntimeError:  # a torch built without oneDNN: keep the input dtype, as before this probe
            pass
    return frozenset(slow)


CPU_SLOW_HALF_DTYPES = _half_dtypes_without_native_cpu_matmul()


def sdpa_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v as the CPU reference paths hand them to torch's SDPA: as they are, or in fp32 for a half-precision
    call that needs gradients on a CPU without native half matmuls (``CPU_SLOW_HALF_DTYPES``), where the fp32
    kernels are several times faster. The caller casts the output back; autograd casts the gradients back."""
    if q.dtype in CPU_SLOW_HALF_DTYPES and q.device.type == "cpu" and torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad):
        return q.float(), k.float(), v.float()
    return q, k, v


def query_may_hold_nan(q: torch.Tensor) -> bool:
    """Whether :func:`nan_query_rows` must fix up the output of an SDPA call on ``q``: take it *before* that call.

    Eager CPU calls with more than one query row pay one read-only reduction of q to a host scalar (q is the
    attention's smallest operand: it reads q once against Nk times for the scores). It is True only for a NaN in q
    (or, harmlessly, infinities of both signs). Why before, and why so spare (issue 26, measured alternating with
    SDPA on 2 cores): the first torch op after a long kernel costs 50-100 us here, so the same check made after
    the SDPA call cost 1.5-2 times what it costs before it (fp32 [2,8,256,40]: 0.94-0.96x of SDPA against
    0.96-0.98x; [8,8,256,64]: 0.96x against 0.97x), and
    ``isnan(q.detach().sum())`` took four dispatched ops where ``q.sum().item()`` takes two. Traced by
    torch.compile, or on a GPU where a branch on a value would synchronise, it is True: the branch-free fix-up,
    which inductor fuses into the output's pass. So it is for a call with one query row per head (a decode step):
    its out is no larger than q, so the fix-up costs what the check would, and the step reads nothing back (what a
    captured decode step needs; tests/test_generate_static_step.py).
    """
    if q.device.type == "cpu" and q.shape[-2] > 1 and not torch.compiler.is_compiling():
        total = (q.detach() if q.requires_grad else q).sum().item()
        return total != total
    return True


def nan_query_rows(q: torch.Tensor, out: torch.Tensor, may_hold_nan: bool = True) -> torch.Tensor:
    """``out`` with NaN in every row whose query row holds a NaN (q [..., N, D], out [..., N, Dv]); ``out`` as it
    is when ``may_hold_nan`` (:func:`query_may_hold_nan`, taken before the SDPA call) is False.

    torch's SDPA CPU kernel can return 0 for such a row (it takes it for a fully masked one: at [2,2,4,64] it
    does, at [2,2,256,64] it gives NaN); every other backend, and the math, give NaN there, and a NaN must never
    come back as a plausible number. The guarantee used to cost four full-tensor passes per call (isnan, any,
    where, and where's backward).
    """
    if not may_hold_nan:
        return out
    return torch.where(q.isnan().any(dim=-1, keepdim=True), float("nan"), out)


# ------------------------------------------------------------------------------------------ dispatch
def triton_supports(device, dtype=None, head_dim=None, **_):
    """The one support check of the attention family's Triton kernels (attention, attention_varlen, decode)."""
    if head_dim is not None and head_dim > TRITON_MAX_HEAD_DIM:
        return f"the Triton kernels take head dims up to {TRITON_MAX_HEAD_DIM}, got {head_dim}"
    return None


__all__ = ["CPU_SLOW_HALF_DTYPES", "Knobs", "TRITON_MAX_HEAD_DIM", "WindowBounds", "allowed_positions",
           "attention_math", "bool_flag", "check_qkv", "dropout_probability", "nan_query_rows", "query_may_hold_nan",
           "sdpa_inputs", "softmax_scale", "triton_supports", "window_bounds", "window_pair"]
