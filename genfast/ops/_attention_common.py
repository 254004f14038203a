"""What the attention ops (attention, attention_varlen, attention_decode) share.

The window rule lives here, once: :func:`window_bounds` turns the public ``causal`` and ``window=(left, right)``
into the two distances every kernel (Triton, C++ CPU, CUDA) and every reference mask reads, so no backend
re-derives them.
"""

from __future__ import annotations

from typing import NamedTuple


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


__all__ = ["WindowBounds", "window_bounds"]
