"""Triton kernels of genfast::scheduler_step_triton and genfast::cfg_combine_triton.

Both are one elementwise pass over flat (contiguous) tensors; the coefficient row of the step is
read on the device (layout: genfast/ops/diffusion.py), so a sampling loop never waits on the host.
"""

import torch
import triton
import triton.language as tl

from genfast.kernels import _philox

# Noise modes of the step kernel (constexpr, so each variant compiles without dead branches).
NO_NOISE, NOISE_TENSOR, NOISE_SEED = 0, 1, 2


@triton.jit
def _scheduler_step_kernel(x_ptr, m_ptr, u_ptr, noise_ptr, seed_ptr, coef_ptr, out_ptr, numel, guidance_scale,
                           HAS_UNCOND: tl.constexpr, NOISE_MODE: tl.constexpr, BLOCK: tl.constexpr):
    # int64 offsets: latents of video models exceed 2^31 elements.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    # The coefficient row, in the order of genfast.ops.diffusion.COEFS.
    ax = tl.load(coef_ptr + 0)
    am = tl.load(coef_ptr + 1)
    lo = tl.load(coef_ptr + 2)
    hi = tl.load(coef_ptr + 3)
    ex = tl.load(coef_ptr + 4)
    em = tl.load(coef_ptr + 5)
    e0 = tl.load(coef_ptr + 6)
    p0 = tl.load(coef_ptr + 7)
    pe = tl.load(coef_ptr + 8)
    px = tl.load(coef_ptr + 9)
    sigma = tl.load(coef_ptr + 10)

    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        u = tl.load(u_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        m = u + guidance_scale * (m - u)
    x0 = ax * x + am * m
    # Written with comparisons, not min/max, so a NaN propagates as it does through torch.clamp.
    x0 = tl.where(x0 < lo, lo, tl.where(x0 > hi, hi, x0))
    eps = ex * x + em * m + e0 * x0
    prev = p0 * x0 + pe * eps + px * x
    if NOISE_MODE == 1:
        prev += sigma * tl.load(noise_ptr + idx, mask=mask, other=0.0)
    elif NOISE_MODE == 2:
        if sigma != 0.0:  # the same for every program: skipping the Philox draw is exact
            seed = tl.load(seed_ptr).to(tl.uint64)
            prev += sigma * _philox.normal(seed, idx.to(tl.uint64))
    tl.store(out_ptr + idx, prev.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cfg_combine_kernel(u_ptr, c_ptr, out_ptr, numel, guidance_scale, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    u = tl.load(u_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, (u + guidance_scale * (c - u)).to(out_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


def scheduler_step(sample: torch.Tensor, model_output: torch.Tensor, model_output_uncond: torch.Tensor | None,
                   guidance_scale: float, coefs: torch.Tensor, noise: torch.Tensor | None,
                   seed: torch.Tensor | None) -> torch.Tensor:
    x = sample.contiguous()
    m = model_output.contiguous()
    u = model_output_uncond.contiguous() if model_output_uncond is not None else x  # x: unused placeholder
    out = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    numel = x.numel()
    if noise is not None:
        mode, noise = NOISE_TENSOR, noise.to(torch.float32).contiguous()
    elif seed is not None:
        mode, noise = NOISE_SEED, x
    else:
        mode, noise = NO_NOISE, x
    seed = seed if seed is not None else coefs  # placeholder pointer, never read outside NOISE_SEED
    if numel:
        _scheduler_step_kernel[(triton.cdiv(numel, _BLOCK),)](
            x, m, u, noise, seed, coefs.to(torch.float32).contiguous(), out, numel, float(guidance_scale),
            HAS_UNCOND=model_output_uncond is not None, NOISE_MODE=mode, BLOCK=_BLOCK)
    return out


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    u = uncond.contiguous()
    c = cond.contiguous()
    out = torch.empty(uncond.shape, dtype=uncond.dtype, device=uncond.device)
    if u.numel():
        _cfg_combine_kernel[(triton.cdiv(u.numel(), _BLOCK),)](u, c, out, u.numel(), float(guidance_scale),
                                                                BLOCK=_BLOCK)
    return out
