"""Triton kernel of genfast::philox_noise_triton: the shared Philox stream as a tensor."""

import torch
import triton
import triton.language as tl

from genfast.kernels import _philox


@triton.jit
def _philox_noise_kernel(seed_ptr, out_ptr, numel, offset, NORMAL: tl.constexpr, BLOCK: tl.constexpr):
    # int64 program offsets: numel may exceed 2^31.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    seed = tl.load(seed_ptr).to(tl.uint64)
    # Stream element indices: the Philox functions map them onto counters (four normals per counter).
    element = (idx + offset).to(tl.uint64)
    if NORMAL:
        value = _philox.normal(seed, element)
    else:
        value = _philox.uniform(seed, element)
    tl.store(out_ptr + idx, value, mask=mask)


def philox_noise(seed: torch.Tensor, numel: int, offset: int, normal: bool) -> torch.Tensor:
    # The kernel adds offset to an int64 index: past 2**63 - 1 it would wrap silently (the op checks this too; the
    # custom op can be called directly).
    if numel < 0 or offset < 0 or offset > 2**63 - 1 - numel:
        raise ValueError(f"philox_noise: numel and offset must be >= 0 with offset + numel <= 2**63 - 1, got "
                         f"numel={numel}, offset={offset}")
    out = torch.empty(numel, device=seed.device, dtype=torch.float32)
    if numel:
        block = _philox.NORMAL_BLOCK if normal else 1024
        _philox_noise_kernel[(triton.cdiv(numel, block),)](seed, out, numel, offset, NORMAL=normal, BLOCK=block)
    return out
