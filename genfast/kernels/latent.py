"""Triton kernels of the latent-variable ops (genfast/ops/latent.py) and their launchers.

Every kernel reads its inputs in their own dtype, computes in float32 and stores in the output's
dtype. In-kernel noise is element ``i`` of the Philox stream for flat index ``i`` of the contiguous
tensor, exactly as ``genfast.ops.philox_noise(seed, numel, normal=True)`` returns it, so a caller
can hand the reference the very noise a kernel drew.

The launchers make their inputs contiguous (the flat index is the logical index) and return
contiguous outputs; the fake implementations in genfast/ops/latent.py promise the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genfast.kernels import _philox

# Elementwise kernels: one program per BLOCK elements; _philox.NORMAL_BLOCK where the kernel draws its noise.
ELEMENTWISE_BLOCK = 1024

# gaussian_kl splits a row over several programs when there are too few rows to fill a GPU: about
# TARGET_PROGRAMS programs in all, each reducing at least MIN_CHUNK elements, at most MAX_SPLITS per
# row. csrc/cuda/latent.cu uses the same plan, so both backends split rows alike.
KL_TARGET_PROGRAMS = 1024
KL_MIN_CHUNK = 2048
KL_MAX_SPLITS = 1024
KL_BLOCK = 1024


@triton.jit
def _eps(noise_ptr, seed_ptr, idx, mask, HAS_NOISE: tl.constexpr):
    """Standard normal noise for flat indices ``idx``: the caller's, or drawn from the Philox stream."""
    if HAS_NOISE:
        return tl.load(noise_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    seed = tl.load(seed_ptr).to(tl.uint64)
    return _philox.normal(seed, idx.to(tl.uint64))


@triton.jit
def _reparameterize_kernel(mu_ptr, logvar_ptr, noise_ptr, seed_ptr, out_ptr, numel,
                           HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    # int64 offsets: numel may exceed 2^31.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    logvar = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    eps = _eps(noise_ptr, seed_ptr, idx, mask, HAS_NOISE)
    tl.store(out_ptr + idx, mu + tl.exp(0.5 * logvar) * eps, mask=mask)


@triton.jit
def _reparameterize_backward_kernel(grad_ptr, logvar_ptr, noise_ptr, seed_ptr, out_ptr, numel,
                                    HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    # dz/dlogvar = 0.5 * exp(0.5 * logvar) * eps; eps is regenerated, never stored by the forward.
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    grad = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    logvar = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    eps = _eps(noise_ptr, seed_ptr, idx, mask, HAS_NOISE)
    tl.store(out_ptr + idx, grad * 0.5 * tl.exp(0.5 * logvar) * eps, mask=mask)


@triton.jit
def _gaussian_kl_partial_kernel(mu_ptr, logvar_ptr, out_ptr, cols, chunk, splits, BLOCK: tl.constexpr):
    """Program (row, split) sums -0.5 * (1 + logvar - mu^2 - exp(logvar)) over its chunk of the row.

    ``chunk`` is a multiple of BLOCK, so blocks never straddle two chunks; out[row * splits + split].
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    base = row * cols
    start = split * chunk
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for offset in range(0, chunk, BLOCK):
        col = start + offset + tl.arange(0, BLOCK)
        mask = col < cols
        mu = tl.load(mu_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
        logvar = tl.load(logvar_ptr + base + col, mask=mask, other=0.0).to(tl.float32)
        # Masked lanes give 1 + 0 - 0 - exp(0) = 0, so they add nothing.
        acc += 1.0 + logvar - mu * mu - tl.exp(logvar)
    tl.store(out_ptr + row * splits + split, -0.5 * tl.sum(acc, axis=0))


@triton.jit
def _sum_rows_kernel(in_ptr, out_ptr, cols, BLOCK: tl.constexpr):
    """Second stage of a split row: out[row] = sum(in[row, :cols]), cols <= BLOCK."""
    row = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, BLOCK)
    values = tl.load(in_ptr + row * cols + col, mask=col < cols, other=0.0)
    tl.store(out_ptr + row, tl.sum(values, axis=0))


@triton.jit
def _gaussian_kl_backward_kernel(grad_ptr, mu_ptr, logvar_ptr, dmu_ptr, dlogvar_ptr, numel, cols,
                                 BLOCK: tl.constexpr):
    # d/dmu = grad[row] * mu; d/dlogvar = grad[row] * 0.5 * (exp(logvar) - 1).
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    grad = tl.load(grad_ptr + idx // cols, mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    logvar = tl.load(logvar_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(dmu_ptr + idx, grad * mu, mask=mask)
    tl.store(dlogvar_ptr + idx, grad * 0.5 * (tl.exp(logvar) - 1.0), mask=mask)


@triton.jit
def _langevin_step_kernel(x_ptr, grad_ptr, noise_ptr, seed_ptr, out_ptr, numel, step_size, noise_scale,
                          clamp_min, clamp_max, HAS_NOISE: tl.constexpr, CLAMP: tl.constexpr, BLOCK: tl.constexpr):
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < numel
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    eps = _eps(noise_ptr, seed_ptr, idx, mask, HAS_NOISE)
    value = x - step_size * grad + noise_scale * eps
    if CLAMP:
        # Comparisons rather than min/max so that NaN passes through, as torch.clamp lets it.
        value = tl.where(value < clamp_min, clamp_min, value)
        value = tl.where(value > clamp_max, clamp_max, value)
    tl.store(out_ptr + idx, value, mask=mask)


def _noise_and_seed(noise: torch.Tensor | None, seed: torch.Tensor | None, out: torch.Tensor):
    """Pointer arguments for _eps and the block: the unused pointer gets ``out``, which the kernel never reads
    through it; drawing the noise in the kernel takes the Philox block (no spills around sin/cos)."""
    if noise is not None:
        return noise.contiguous(), out, True, ELEMENTWISE_BLOCK
    return out, seed, False, _philox.NORMAL_BLOCK


def _elementwise_grid(numel: int, block: int = ELEMENTWISE_BLOCK):
    return (triton.cdiv(numel, block),)


def reparameterize(mu, logvar, noise, seed):
    mu, logvar = mu.contiguous(), logvar.contiguous()
    out = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    numel = mu.numel()
    if numel:
        noise_arg, seed_arg, has_noise, block = _noise_and_seed(noise, seed, out)
        _reparameterize_kernel[_elementwise_grid(numel, block)](mu, logvar, noise_arg, seed_arg, out, numel,
                                                                HAS_NOISE=has_noise, BLOCK=block)
    return out


def reparameterize_backward(grad, logvar, noise, seed):
    # grad is often an expanded (stride-0) tensor, e.g. from z.sum().backward().
    grad, logvar = grad.contiguous(), logvar.contiguous()
    out = torch.empty(logvar.shape, dtype=logvar.dtype, device=logvar.device)
    numel = logvar.numel()
    if numel:
        noise_arg, seed_arg, has_noise, block = _noise_and_seed(noise, seed, out)
        _reparameterize_backward_kernel[_elementwise_grid(numel, block)](grad, logvar, noise_arg, seed_arg, out,
                                                                         numel, HAS_NOISE=has_noise, BLOCK=block)
    return out


def kl_plan(rows: int, cols: int, block: int) -> tuple[int, int]:
    """(splits, chunk) for a [rows, cols] reduction: chunk is a multiple of ``block``, splits * chunk >= cols."""
    splits = min(KL_MAX_SPLITS, max(1, KL_TARGET_PROGRAMS // max(rows, 1)), max(1, triton.cdiv(cols, KL_MIN_CHUNK)))
    chunk = triton.cdiv(triton.cdiv(cols, splits), block) * block
    return triton.cdiv(cols, chunk), chunk


def gaussian_kl(mu, logvar):
    mu, logvar = mu.contiguous(), logvar.contiguous()
    rows = mu.shape[0]
    cols = mu.numel() // rows if rows else 0
    out = torch.zeros(rows, dtype=torch.float32, device=mu.device)
    if rows == 0 or cols == 0:
        return out
    block = min(KL_BLOCK, triton.next_power_of_2(cols))
    splits, chunk = kl_plan(rows, cols, block)
    if splits == 1:
        _gaussian_kl_partial_kernel[(rows, 1)](mu, logvar, out, cols, chunk, 1, BLOCK=block)
        return out
    # Two stages, not atomics: the sum's grouping, hence its bits, is the same on every run.
    partial = torch.empty(rows, splits, dtype=torch.float32, device=mu.device)
    _gaussian_kl_partial_kernel[(rows, splits)](mu, logvar, partial, cols, chunk, splits, BLOCK=block)
    _sum_rows_kernel[(rows,)](partial, out, splits, BLOCK=triton.next_power_of_2(splits))
    return out


def gaussian_kl_backward(grad, mu, logvar):
    grad, mu, logvar = grad.float().contiguous(), mu.contiguous(), logvar.contiguous()
    dmu = torch.empty(mu.shape, dtype=mu.dtype, device=mu.device)
    dlogvar = torch.empty(logvar.shape, dtype=logvar.dtype, device=logvar.device)
    numel = mu.numel()
    if numel:
        cols = numel // mu.shape[0]
        _gaussian_kl_backward_kernel[_elementwise_grid(numel)](grad, mu, logvar, dmu, dlogvar, numel, cols,
                                                               BLOCK=ELEMENTWISE_BLOCK)
    return dmu, dlogvar


def langevin_step(x, grad, step_size, noise_scale, clamp_min, clamp_max, noise, seed):
    x, grad = x.contiguous(), grad.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    numel = x.numel()
    if numel:
        noise_arg, seed_arg, has_noise, block = _noise_and_seed(noise, seed, out)
        clamp = clamp_min != float("-inf") or clamp_max != float("inf")
        _langevin_step_kernel[_elementwise_grid(numel, block)](
            x, grad, noise_arg, seed_arg, out, numel, float(step_size), float(noise_scale),
            float(clamp_min) if clamp else 0.0, float(clamp_max) if clamp else 0.0,
            HAS_NOISE=has_noise, CLAMP=clamp, BLOCK=block)
    return out
