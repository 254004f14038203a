"""Philox4x32-10 for Triton kernels, bit-identical to genfast/_philox.py and csrc/philox.h.

Triton ships its own ``tl.rand``, but its stream layout and float conversion have changed between
releases; genfast owns its generator so that the Triton, CUDA and C++ backends draw the same noise
for the same seed, on every Triton version.
"""

import triton
import triton.language as tl

# Elements per program of a kernel that draws normals (``normal``): two per thread of the default 4 warps. Each
# element's sin/cos carries libdevice's slow argument reduction (a local array), and ptxas spills 8 B around it
# from 4 elements per thread on (4 or 8 warps, sm_90a and sm_80, triton 3.6: latent; 3.9: 8 per thread) while 2
# spill nothing. The stream is per element index, so the block changes no number.
NORMAL_BLOCK = 256


@triton.jit
def philox4x32_10(seed, offset):
    """``seed``: a uint64 scalar; ``offset``: a uint64 block. Returns four uint32 blocks."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = (offset & 0xFFFFFFFF).to(tl.uint32)
    c1 = (offset >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(10):
        p0 = c0
        p2 = c2
        c0 = tl.math.umulhi(p2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.math.umulhi(p0, 0xD2511F53) ^ c3 ^ k1
        c1 = p2 * 0xCD9E8D57
        c3 = p0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def unit_open(bits):
    """24 random bits onto the centres of 2^24 cells: strictly inside (0, 1)."""
    return ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def uniform(seed, offset):
    c0, _, _, _ = philox4x32_10(seed, offset)
    return unit_open(c0)


@triton.jit
def normal(seed, offset):
    """Normal element ``offset``: lane ``offset & 3`` of the call at counter ``offset >> 2``.

    Lanes 0..3 are ``r1 cos t1, r1 sin t1, r2 cos t2, r2 sin t2`` with ``r1, t1`` from words 0, 1 and
    ``r2, t2`` from words 2, 3 (the layout of genfast/_philox.py). Neighbouring elements of a block
    share a call, which Triton recomputes per element; the numbers are what matter here.
    """
    c0, c1, c2, c3 = philox4x32_10(seed, offset >> 2)
    lane = offset & 3
    first_pair = lane < 2
    radius = tl.sqrt(-2.0 * tl.log(unit_open(tl.where(first_pair, c0, c2))))
    angle = 6.283185307179586 * unit_open(tl.where(first_pair, c1, c3))
    return radius * tl.where((lane & 1) == 1, tl.sin(angle), tl.cos(angle))
