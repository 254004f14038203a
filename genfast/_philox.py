"""Philox4x32-10 in NumPy: the specification of genfast's in-kernel random numbers.

Every backend (C++ ``csrc/philox.h``, CUDA through the same header, Triton
``genfast/kernels/_philox.py``) draws element ``offset`` of the stream seeded with ``seed`` exactly
as these functions do, so the tests can hand the reference the very noise a kernel drew inside
itself. Speed is irrelevant here; clarity and bit-exactness are the point.

Stream layout. Philox is keyed by ``(seed & 0xffffffff, seed >> 32)``; one call at counter ``c``
gives four 32-bit words ``(x, y, z, w)``.

- Uniform element ``i``: counter ``i``, word ``x`` (one call per uniform).
- Normal element ``i``: lane ``i & 3`` of the call at counter ``i >> 2`` (four normals per call).
  With ``u1..u4 = unit_open(x..w)``, ``r1 = sqrt(-2 log u1)``, ``t1 = 2 pi u2``,
  ``r2 = sqrt(-2 log u3)``, ``t2 = 2 pi u4``, the lanes are ``r1 cos t1, r1 sin t1, r2 cos t2,
  r2 sin t2``: both outputs of two Box-Muller transforms, which are independent standard normals.
"""

from __future__ import annotations

import numpy as np

_ROUND_A = np.uint64(0xD2511F53)
_ROUND_B = np.uint64(0xCD9E8D57)
_KEY_A = np.uint64(0x9E3779B9)
_KEY_B = np.uint64(0xBB67AE85)
_MASK32 = np.uint64(0xFFFFFFFF)


def _seed_bits(seed) -> np.ndarray:
    """A seed (an int, or an integer array of per-element seeds) as its 64 bits, uint64: negative int64 seeds
    key Philox with their two's-complement bits, as the kernels' casts of an int64 seed to uint64 do."""
    if isinstance(seed, (int, np.integer)):
        return np.uint64(int(seed) & 0xFFFFFFFFFFFFFFFF)
    return np.asarray(seed, dtype=np.int64).astype(np.uint64)


def philox4x32_10(seed, offsets: np.ndarray) -> tuple[np.ndarray, ...]:
    """The four 32-bit output words for each counter in ``offsets`` (uint64 arrays).

    ``seed`` is an int, or an int64 array that broadcasts against ``offsets`` (one key per element: the
    per-row seeds of sample_tokens).
    """
    seed = _seed_bits(seed)
    offsets = np.asarray(offsets, dtype=np.uint64)
    seed, offsets = np.broadcast_arrays(seed, offsets)
    k0 = seed & _MASK32
    k1 = seed >> np.uint64(32)
    c0 = offsets & _MASK32
    c1 = offsets >> np.uint64(32)
    c2 = np.zeros_like(offsets)
    c3 = np.zeros_like(offsets)
    for _ in range(10):
        # Products of two 32-bit values fit in uint64 exactly, so the high word is a shift.
        prod_b = _ROUND_B * c2
        prod_a = _ROUND_A * c0
        c0, c1, c2, c3 = (
            (prod_b >> np.uint64(32)) ^ c1 ^ k0,
            prod_b & _MASK32,
            (prod_a >> np.uint64(32)) ^ c3 ^ k1,
            prod_a & _MASK32,
        )
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _unit_open(bits: np.ndarray) -> np.ndarray:
    # float32 arithmetic on purpose: the kernels compute in float32 and must agree bit for bit.
    return ((bits >> np.uint64(8)).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / 16777216.0)


def uniform(seed, offsets: np.ndarray) -> np.ndarray:
    """Uniform float32 in the open interval (0, 1); ``seed`` as for :func:`philox4x32_10`."""
    return _unit_open(philox4x32_10(seed, offsets)[0])


def _box_muller(radius_bits: np.ndarray, angle_bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sqrt(-2 log u)`` and ``2 pi v`` in float32 for the words behind ``u`` and ``v``."""
    radius = np.sqrt(np.float32(-2.0) * np.log(_unit_open(radius_bits)))
    return radius, np.float32(6.283185307179586) * _unit_open(angle_bits)


def normal4(seed: int, counters: np.ndarray) -> np.ndarray:
    """The four normals of each Philox call: float32 of shape ``counters.shape + (4,)``.

    Row ``c`` holds normal elements ``4c .. 4c+3`` of the stream (see the module docstring).
    """
    x, y, z, w = philox4x32_10(seed, counters)
    r1, t1 = _box_muller(x, y)
    r2, t2 = _box_muller(z, w)
    return np.stack([r1 * np.cos(t1), r1 * np.sin(t1), r2 * np.cos(t2), r2 * np.sin(t2)], axis=-1).astype(np.float32)


def normal(seed: int, offsets: np.ndarray) -> np.ndarray:
    """Standard normal float32 for each element index in ``offsets``: lane ``i & 3`` of call ``i >> 2``.

    Equal to ``normal4(seed, offsets >> 2)[..., offsets & 3]``, computing only the lane each element needs.
    """
    offsets = np.asarray(offsets, dtype=np.uint64)
    x, y, z, w = philox4x32_10(seed, offsets >> np.uint64(2))
    lane = offsets & np.uint64(3)
    first_pair = lane < np.uint64(2)
    radius, angle = _box_muller(np.where(first_pair, x, z), np.where(first_pair, y, w))
    sine = (lane & np.uint64(1)) == np.uint64(1)
    trig = np.empty_like(angle)
    trig[sine] = np.sin(angle[sine])
    trig[~sine] = np.cos(angle[~sine])
    return (radius * trig).astype(np.float32)

