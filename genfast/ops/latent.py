"""Latent-variable sampling: the VAE reparameterization trick, the Gaussian KL term, a Langevin step.

Public ops (argument checks, then the backend in force):
- ``reparameterize(mu, logvar)``: z = mu + exp(0.5 * logvar) * eps, eps ~ N(0, I).
- ``gaussian_kl(mu, logvar, reduction=...)``: KL(N(mu, exp(logvar)) || N(0, I)) per sample, summed or averaged.
- ``langevin_step(x, grad, step_size, noise_scale)``: x - step_size * grad + noise_scale * eps, optionally clamped.

Each has a reference (``*_ref``: plain PyTorch, the spec, differentiable by ordinary autograd), a Triton
kernel (custom op ``genfast::<op>_triton``) and a CUDA kernel (custom op ``genfast::<op>``, schema in
csrc/genfast.cpp). There is no C++ CPU kernel: on CPU tensors ``auto`` runs the reference.

Noise: element ``i`` of eps (flat index of the contiguous tensor) is ``philox_noise(seed, numel, normal=True)[i]``
for a seed drawn from ``generator``, on every backend; or the caller passes ``noise`` itself.
"""

from __future__ import annotations

import math

import torch

from genfast import _backend, _ext
from genfast.ops import _checks
from genfast.ops.random import philox_noise

REDUCTIONS = ("per_sample", "sum", "mean", "none")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 are computed in fp32; fp64 (gradcheck, long-row accuracy tests) stays fp64.
    return torch.promote_types(dtype, torch.float32)


def _eps(noise: torch.Tensor | None, seed: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The op's standard normal noise for a tensor shaped like ``like``: the caller's, else the Philox stream's."""
    if noise is not None:
        return noise.to(_compute_dtype(like.dtype))
    if seed is None:
        raise ValueError("latent reference: pass noise or seed")
    return philox_noise(seed, like.numel(), normal=True).reshape(like.shape).to(_compute_dtype(like.dtype))


# ------------------------------------------------------------------------------------------- references
def reparameterize_ref(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None = None,
                       seed: torch.Tensor | None = None) -> torch.Tensor:
    """z = mu + exp(0.5 * logvar) * eps, computed in (at least) fp32, returned in mu's dtype and shape."""
    compute = _compute_dtype(mu.dtype)
    eps = _eps(noise, seed, mu)
    return (mu.to(compute) + torch.exp(0.5 * logvar.to(compute)) * eps).to(mu.dtype)


def gaussian_kl_ref(mu: torch.Tensor, logvar: torch.Tensor, reduction: str = "per_sample") -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in (at least) fp32.

    "none": elementwise -0.5 * (1 + logvar - mu^2 - exp(logvar)), mu's shape; "per_sample": summed over every
    dim but the first, [B]; "sum": a scalar; "mean": the mean over the batch of the per-sample values.
    """
    compute = _compute_dtype(mu.dtype)
    mu, logvar = mu.to(compute), logvar.to(compute)
    elementwise = -0.5 * (1 + logvar - mu * mu - torch.exp(logvar))
    if reduction == "none":
        return elementwise
    # flatten, not reshape(B, -1): -1 is ambiguous for an empty batch (B = 0).
    per_sample = elementwise.flatten(1).sum(dim=1) if mu.dim() > 1 else elementwise
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    return per_sample


def langevin_step_ref(x: torch.Tensor, grad: torch.Tensor, step_size: float, noise_scale: float,
                      clamp_min: float = -math.inf, clamp_max: float = math.inf, noise: torch.Tensor | None = None,
                      seed: torch.Tensor | None = None) -> torch.Tensor:
    """x - step_size * grad + noise_scale * eps, clamped to [clamp_min, clamp_max], in x's dtype."""
    compute = _compute_dtype(x.dtype)
    value = x.to(compute) - step_size * grad.to(compute) + noise_scale * _eps(noise, seed, x)
    if clamp_min != -math.inf or clamp_max != math.inf:
        value = value.clamp(clamp_min, clamp_max)
    return value.to(x.dtype)


# ------------------------------------------------------------------------------------------- fake impls
# Kernels return contiguous outputs whatever the inputs' strides, and the fakes say so.
def _reparameterize_fake(mu, logvar, noise, seed):
    return mu.new_empty(mu.shape)


def _reparameterize_backward_fake(grad, logvar, noise, seed):
    return logvar.new_empty(logvar.shape)


def _gaussian_kl_fake(mu, logvar):
    return mu.new_empty(mu.shape[0], dtype=torch.float32)


def _gaussian_kl_backward_fake(grad, mu, logvar):
    return mu.new_empty(mu.shape), logvar.new_empty(logvar.shape)


def _langevin_step_fake(x, grad, step_size, noise_scale, clamp_min, clamp_max, noise, seed):
    return x.new_empty(x.shape)


# ------------------------------------------------------------------------------------------- Triton twins
@torch.library.custom_op("genfast::reparameterize_triton", mutates_args=())
def _reparameterize_triton(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None,
                           seed: torch.Tensor | None) -> torch.Tensor:
    from genfast.kernels import latent

    return latent.reparameterize(mu, logvar, noise, seed)


@torch.library.custom_op("genfast::reparameterize_backward_triton", mutates_args=())
def _reparameterize_backward_triton(grad: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None,
                                    seed: torch.Tensor | None) -> torch.Tensor:
    from genfast.kernels import latent

    return latent.reparameterize_backward(grad, logvar, noise, seed)


@torch.library.custom_op("genfast::gaussian_kl_triton", mutates_args=())
def _gaussian_kl_triton(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    from genfast.kernels import latent

    return latent.gaussian_kl(mu, logvar)


@torch.library.custom_op("genfast::gaussian_kl_backward_triton", mutates_args=())
def _gaussian_kl_backward_triton(grad: torch.Tensor, mu: torch.Tensor,
                                 logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from genfast.kernels import latent

    return latent.gaussian_kl_backward(grad, mu, logvar)


@torch.library.custom_op("genfast::langevin_step_triton", mutates_args=())
def _langevin_step_triton(x: torch.Tensor, grad: torch.Tensor, step_size: float, noise_scale: float,
                          clamp_min: float, clamp_max: float, noise: torch.Tensor | None,
                          seed: torch.Tensor | None) -> torch.Tensor:
    from genfast.kernels import latent

    return latent.langevin_step(x, grad, step_size, noise_scale, clamp_min, clamp_max, noise, seed)


# ------------------------------------------------------------------------------------------- autograd
def _register(suffix: str, noise_op) -> None:
    """Fake impls and autograd for one family of ops: "" (C++/CUDA, csrc) or "_triton".

    ``noise_op(seed, numel)`` regenerates the Philox normals on the same backend, for the clamp mask of
    langevin_step's backward.
    """
    ops = torch.ops.genfast
    reparameterize_backward = getattr(ops, "reparameterize_backward" + suffix)
    gaussian_kl_backward = getattr(ops, "gaussian_kl_backward" + suffix)
    for name, fake in [("reparameterize", _reparameterize_fake),
                       ("reparameterize_backward", _reparameterize_backward_fake),
                       ("gaussian_kl", _gaussian_kl_fake),
                       ("gaussian_kl_backward", _gaussian_kl_backward_fake),
                       ("langevin_step", _langevin_step_fake)]:
        torch.library.register_fake(f"genfast::{name}{suffix}")(fake)

    # reparameterize: dmu = grad; dlogvar regenerates eps from the seed (or reads the caller's noise),
    # so the forward saves nothing of size N beyond logvar.
    def reparameterize_setup(ctx, inputs, output):
        _, logvar, noise, seed = inputs
        ctx.save_for_backward(logvar, noise, seed)

    def reparameterize_backward_fn(ctx, grad):
        logvar, noise, seed = ctx.saved_tensors
        dlogvar = reparameterize_backward(grad, logvar, noise, seed) if ctx.needs_input_grad[1] else None
        return grad, dlogvar, None, None

    torch.library.register_autograd(f"genfast::reparameterize{suffix}", reparameterize_backward_fn,
                                    setup_context=reparameterize_setup)

    def kl_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def kl_backward_fn(ctx, grad):
        mu, logvar = ctx.saved_tensors
        return gaussian_kl_backward(grad, mu, logvar)

    torch.library.register_autograd(f"genfast::gaussian_kl{suffix}", kl_backward_fn, setup_context=kl_setup)

    # langevin_step: the gradient passes where the clamp did not bite (torch.clamp's rule: lo <= v <= hi on
    # the unclamped value v). Without a clamp nothing is saved; with one, v is recomputed from x, grad and eps.
    def langevin_setup(ctx, inputs, output):
        x, grad, step_size, noise_scale, clamp_min, clamp_max, noise, seed = inputs
        ctx.step_size, ctx.noise_scale = step_size, noise_scale
        ctx.clamp = (clamp_min, clamp_max) if (clamp_min != -math.inf or clamp_max != math.inf) else None
        ctx.save_for_backward(*((x, grad, noise, seed) if ctx.clamp else ()))

    def langevin_backward_fn(ctx, g):
        if ctx.clamp is not None:
            x, grad, noise, seed = ctx.saved_tensors
            eps = noise if noise is not None else noise_op(seed, x.numel())
            value = x.float() - ctx.step_size * grad.float() + ctx.noise_scale * eps.reshape(x.shape).float()
            g = g * ((value >= ctx.clamp[0]) & (value <= ctx.clamp[1]))
        return g, -ctx.step_size * g, None, None, None, None, None, None

    torch.library.register_autograd(f"genfast::langevin_step{suffix}", langevin_backward_fn,
                                    setup_context=langevin_setup)


_register("_triton", lambda seed, numel: torch.ops.genfast.philox_noise_triton(seed, numel, 0, True))
if _ext.loaded:
    _register("", lambda seed, numel: torch.ops.genfast.philox_noise(seed, numel, 0, True))


# ------------------------------------------------------------------------------------------- dispatch
_reparameterize = _backend.dispatcher("reparameterize", reparameterize_ref)
_reparameterize.register("triton")(lambda *a: torch.ops.genfast.reparameterize_triton(*a))
_reparameterize.register("cuda")(lambda *a: torch.ops.genfast.reparameterize(*a))

_gaussian_kl = _backend.dispatcher("gaussian_kl", gaussian_kl_ref)
_gaussian_kl.register("triton")(lambda mu, logvar: torch.ops.genfast.gaussian_kl_triton(mu, logvar))
_gaussian_kl.register("cuda")(lambda mu, logvar: torch.ops.genfast.gaussian_kl(mu, logvar))

_langevin_step = _backend.dispatcher("langevin_step", langevin_step_ref)
_langevin_step.register("triton")(lambda *a: torch.ops.genfast.langevin_step_triton(*a))
_langevin_step.register("cuda")(lambda *a: torch.ops.genfast.langevin_step(*a))


def _pair(op: str, first: str, a, second: str, b) -> None:
    """Two float tensors of one shape, dtype and device."""
    _checks.tensor(op, first, a, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(op, second, b, dtypes=_checks.FLOAT_DTYPES)
    _checks.same_device(op, first, a, **{second: b})
    _checks.same_shape(op, first, a, **{second: b})
    if a.dtype != b.dtype:
        raise TypeError(f"{op}: {second} has dtype {b.dtype} but {first} has dtype {a.dtype}")


# ------------------------------------------------------------------------------------------- public ops
def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, *, generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """z = mu + exp(0.5 * logvar) * eps with eps ~ N(0, I): the VAE reparameterization trick.

    mu, logvar: any shape (the same), float32/float16/bfloat16 (the same), one device. Returns z, mu's shape
    and dtype, contiguous. eps is the caller's ``noise`` (mu's shape) or genfast's Philox stream for a seed
    drawn from ``generator``. Differentiable in mu and logvar: dmu = dz, dlogvar = dz * 0.5 * exp(0.5 * logvar)
    * eps, with eps regenerated from the seed in the backward rather than stored.
    """
    op = "reparameterize"
    _pair(op, "mu", mu, "logvar", logvar)
    noise, seed = _checks.noise_or_seed(op, mu, noise, generator)
    return _reparameterize(mu, logvar, noise, seed, device=mu.device, dtype=mu.dtype)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor, *, reduction: str = "per_sample") -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) = -0.5 * sum(1 + logvar - mu^2 - exp(logvar)).

    mu, logvar: [B, ...] (the same shape, dtype and device; float32/float16/bfloat16). Returns float32:
    "per_sample" [B], the sum over every dim but the first (one fused kernel, fp32 accumulation);
    "sum" and "mean" a scalar (over the batch of the per-sample values); "none" the elementwise terms,
    mu's shape, computed by the reference formula (plain PyTorch). Differentiable in mu and logvar.
    An empty batch (B = 0) is legal: "per_sample" [0], "sum" 0 and "mean" NaN (torch.mean of nothing).
    """
    op = "gaussian_kl"
    _pair(op, "mu", mu, "logvar", logvar)
    if mu.dim() < 1:
        raise ValueError(f"{op}: mu must have at least 1 dimension (the batch), got shape {tuple(mu.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    if reduction == "none":
        return gaussian_kl_ref(mu, logvar, "none")
    per_sample = _gaussian_kl(mu, logvar, device=mu.device, dtype=mu.dtype)
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    return per_sample


def langevin_step(x: torch.Tensor, grad: torch.Tensor, step_size: float, noise_scale: float, *,
                  clamp: tuple[float, float] | None = None, generator: torch.Generator | None = None,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """One (unadjusted) Langevin step: x - step_size * grad + noise_scale * eps, clamped to ``clamp`` if given.

    x, grad: any shape (the same), float32/float16/bfloat16 (the same), one device; step_size, noise_scale:
    finite and >= 0; clamp: (lo, hi) with lo < hi (either may be infinite). For the textbook step on
    log-density gradients, pass grad = -d log p / dx and noise_scale = sqrt(2 * step_size). eps as in
    ``reparameterize``. Returns x's shape and dtype, contiguous. Differentiable in x and grad:
    dx = g where the clamp did not bite, dgrad = -step_size * dx.
    """
    op = "langevin_step"
    _pair(op, "x", x, "grad", grad)
    step_size = _checks.real_number(op, "step_size", step_size)
    noise_scale = _checks.real_number(op, "noise_scale", noise_scale)
    for name, value in (("step_size", step_size), ("noise_scale", noise_scale)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{op}: {name} must be finite and >= 0, got {value}")
    clamp_min, clamp_max = -math.inf, math.inf
    if clamp is not None:
        if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
            raise TypeError(f"{op}: clamp must be None or a pair (lo, hi), got {clamp!r}")
        clamp_min = _checks.real_number(op, "clamp[0]", clamp[0])
        clamp_max = _checks.real_number(op, "clamp[1]", clamp[1])
        if not clamp_min < clamp_max:
            raise ValueError(f"{op}: clamp must have lo < hi, got ({clamp_min}, {clamp_max})")
    noise, seed = _checks.noise_or_seed(op, x, noise, generator)
    return _langevin_step(x, grad, step_size, noise_scale, clamp_min, clamp_max, noise, seed,
                          device=x.device, dtype=x.dtype)


__all__ = [
    "reparameterize", "reparameterize_ref", "gaussian_kl", "gaussian_kl_ref", "langevin_step", "langevin_step_ref",
]
