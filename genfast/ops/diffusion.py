"""Diffusion sampling ops: one fused scheduler step, and classifier-free guidance.

``scheduler_step`` runs a whole DDPM/DDIM step as one elementwise pass. The scheduler
(genfast/diffusion) turns its alphas into a row of 11 float32 coefficients per step, laid out as
``COEFS`` below, and every backend computes, per element and in float32::

    m    = model_output                                   (or uncond + g * (model_output - uncond))
    x0   = AX * x + AM * m                                the predicted clean sample
    x0   = clamp(x0, CLIP_LO, CLIP_HI)                    (-inf, +inf when clipping is off)
    eps  = EX * x + EM * m + E0 * x0                      the predicted noise
    prev = P0 * x0 + PE * eps + PX * x + SIGMA * noise    the sample at the previous timestep

with ``x`` the sample. DDPM uses P0/PX/SIGMA (eps unused), DDIM P0/PE/SIGMA; E0 serves DDIM's
``use_clipped_model_output``. ``noise`` is the caller's tensor, or drawn inside the kernel from
genfast's Philox stream (element ``i`` of the contiguous output draws ``normal(seed, i)``), or absent
(the SIGMA term is dropped). Kernels skip drawing noise when SIGMA is 0, which is exact.

The coefficients stay on the device and are read there, so a sampling loop never synchronises the
host. The output is a new contiguous tensor in ``sample``'s dtype.
"""

from __future__ import annotations

import torch

from genfast import _backend, _ext
from genfast.ops import _checks
from genfast.ops.random import philox_noise_ref

# Indices into a coefficient row; the C++, CUDA and Triton kernels use the same numbers.
AX, AM, CLIP_LO, CLIP_HI, EX, EM, E0, P0, PE, PX, SIGMA = range(11)
COEFS = ("AX", "AM", "CLIP_LO", "CLIP_HI", "EX", "EM", "E0", "P0", "PE", "PX", "SIGMA")
NUM_COEFS = len(COEFS)

STEP_OP = "scheduler_step"
CFG_OP = "cfg_combine"


# ---------------------------------------------------------------------------------------------- reference
def cfg_combine_ref(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """``uncond + g * (cond - uncond)`` computed in float32, returned in ``uncond``'s dtype."""
    u = uncond.float()
    return (u + guidance_scale * (cond.float() - u)).to(uncond.dtype)


def scheduler_step_ref(sample: torch.Tensor, model_output: torch.Tensor, model_output_uncond: torch.Tensor | None,
                       guidance_scale: float, coefs: torch.Tensor, noise: torch.Tensor | None,
                       seed: torch.Tensor | None) -> torch.Tensor:
    """The fused step's specification, term by term in float32 (layout in the module docstring)."""
    x = sample.float()
    m = model_output.float()
    if model_output_uncond is not None:
        u = model_output_uncond.float()
        m = u + guidance_scale * (m - u)
    c = coefs.float()
    x0 = c[AX] * x + c[AM] * m
    x0 = torch.clamp(x0, c[CLIP_LO], c[CLIP_HI])
    eps = c[EX] * x + c[EM] * m + c[E0] * x0
    prev = c[P0] * x0 + c[PE] * eps + c[PX] * x
    if noise is not None:
        prev = prev + c[SIGMA] * noise.float().reshape(x.shape)
    elif seed is not None:
        drawn = philox_noise_ref(seed, x.numel(), 0, True).reshape(x.shape)
        prev = prev + c[SIGMA] * drawn
    return prev.to(sample.dtype)


# ---------------------------------------------------------------------------------------------- fake impls
def _step_fake(sample, model_output, model_output_uncond, guidance_scale, coefs, noise, seed):
    return torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)


def _cfg_fake(uncond, cond, guidance_scale):
    return torch.empty(uncond.shape, dtype=uncond.dtype, device=uncond.device)


# ---------------------------------------------------------------------------------------------- autograd
# The step is linear in sample, model_output(s) and noise, except for the clamp, whose gradient is
# passed where lo <= x0 <= hi (as torch.clamp does). The backward is plain torch on the saved inputs:
# it is not the hot path, and it reads the coefficients on the device (no host sync).
def _step_setup_context(ctx, inputs, output):
    sample, model_output, model_output_uncond, guidance_scale, coefs, noise, seed = inputs
    ctx.guidance_scale = guidance_scale
    ctx.has_uncond = model_output_uncond is not None
    ctx.noise_dtype = noise.dtype if noise is not None else None
    ctx.save_for_backward(sample, model_output, model_output_uncond, coefs)


def _step_backward(ctx, grad):
    sample, model_output, uncond, coefs = ctx.saved_tensors
    g = ctx.guidance_scale
    c = coefs.float()
    grad = grad.float()
    x, m = sample.float(), model_output.float()
    if uncond is not None:
        m = uncond.float() + g * (m - uncond.float())
    x0 = c[AX] * x + c[AM] * m
    inside = (x0 >= c[CLIP_LO]) & (x0 <= c[CLIP_HI])
    grad_x0 = torch.where(inside, grad * (c[P0] + c[PE] * c[E0]), torch.zeros_like(grad))
    grad_x = grad * (c[PX] + c[PE] * c[EX]) + grad_x0 * c[AX]
    grad_m = grad * (c[PE] * c[EM]) + grad_x0 * c[AM]
    grad_cond = grad_m * g if uncond is not None else grad_m
    grad_uncond = (grad_m * (1.0 - g)).to(uncond.dtype) if uncond is not None else None
    grad_noise = (grad * c[SIGMA]).to(ctx.noise_dtype) if ctx.noise_dtype is not None else None
    return (grad_x.to(sample.dtype), grad_cond.to(model_output.dtype), grad_uncond, None, None, grad_noise, None)


def _cfg_setup_context(ctx, inputs, output):
    ctx.guidance_scale = inputs[2]
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)


def _cfg_backward(ctx, grad):
    g = ctx.guidance_scale
    grad = grad.float()
    return (grad * (1.0 - g)).to(ctx.dtypes[0]), (grad * g).to(ctx.dtypes[1]), None


# ---------------------------------------------------------------------------------------------- registration
@torch.library.custom_op(f"genfast::{STEP_OP}_triton", mutates_args=())
def _scheduler_step_triton(sample: torch.Tensor, model_output: torch.Tensor,
                           model_output_uncond: torch.Tensor | None, guidance_scale: float, coefs: torch.Tensor,
                           noise: torch.Tensor | None, seed: torch.Tensor | None) -> torch.Tensor:
    from genfast.kernels.diffusion import scheduler_step

    return scheduler_step(sample, model_output, model_output_uncond, guidance_scale, coefs, noise, seed)


@torch.library.custom_op(f"genfast::{CFG_OP}_triton", mutates_args=())
def _cfg_combine_triton(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    from genfast.kernels.diffusion import cfg_combine

    return cfg_combine(uncond, cond, guidance_scale)


_scheduler_step_triton.register_fake(_step_fake)
_cfg_combine_triton.register_fake(_cfg_fake)
_scheduler_step_triton.register_autograd(_step_backward, setup_context=_step_setup_context)
_cfg_combine_triton.register_autograd(_cfg_backward, setup_context=_cfg_setup_context)

if _ext.loaded:
    torch.library.register_fake(f"genfast::{STEP_OP}")(_step_fake)
    torch.library.register_fake(f"genfast::{CFG_OP}")(_cfg_fake)
    torch.library.register_autograd(f"genfast::{STEP_OP}", _step_backward, setup_context=_step_setup_context)
    torch.library.register_autograd(f"genfast::{CFG_OP}", _cfg_backward, setup_context=_cfg_setup_context)


def _float_only(device, dtype=None, **_):
    if dtype is not None and dtype not in _checks.FLOAT_DTYPES:
        return f"no kernel for {dtype}"
    return None


_call = _checks.call_op  # a step is a few microseconds of work on a small latent: skip the autograd layer


_step_dispatch = _backend.dispatcher(STEP_OP, scheduler_step_ref)
_step_dispatch.register("triton", _float_only)(lambda *a: _call(torch.ops.genfast.scheduler_step_triton.default, *a))
_step_dispatch.register("cpu", _float_only)(lambda *a: _call(torch.ops.genfast.scheduler_step.default, *a))
_step_dispatch.register("cuda", _float_only)(lambda *a: _call(torch.ops.genfast.scheduler_step.default, *a))

_cfg_dispatch = _backend.dispatcher(CFG_OP, cfg_combine_ref)
_cfg_dispatch.register("triton", _float_only)(lambda *a: _call(torch.ops.genfast.cfg_combine_triton.default, *a))
_cfg_dispatch.register("cpu", _float_only)(lambda *a: _call(torch.ops.genfast.cfg_combine.default, *a))
_cfg_dispatch.register("cuda", _float_only)(lambda *a: _call(torch.ops.genfast.cfg_combine.default, *a))


def run_step(sample, model_output, model_output_uncond, guidance_scale: float, coefs, noise, seed) -> torch.Tensor:
    """The step on the backend in force, arguments already checked (the schedulers call this)."""
    return _step_dispatch(sample, model_output, model_output_uncond, guidance_scale, coefs, noise, seed,
                          device=sample.device, dtype=sample.dtype)


# ---------------------------------------------------------------------------------------------- public ops
def check_step_inputs(op: str, sample, model_output, model_output_uncond) -> None:
    """The step's tensors: float32/float16/bfloat16, one shape, one dtype, one device."""
    _checks.tensor(op, "sample", sample, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(op, "model_output", model_output, dtypes=_checks.FLOAT_DTYPES)
    if model_output_uncond is not None:
        _checks.tensor(op, "model_output_uncond", model_output_uncond, dtypes=_checks.FLOAT_DTYPES)
    _checks.same_device(op, "sample", sample, model_output=model_output, model_output_uncond=model_output_uncond)
    _checks.same_shape(op, "sample", sample, model_output=model_output, model_output_uncond=model_output_uncond)
    for name, other in (("model_output", model_output), ("model_output_uncond", model_output_uncond)):
        if other is not None and other.dtype != sample.dtype:
            raise TypeError(f"{op}: {name} has dtype {other.dtype} but sample has dtype {sample.dtype}")


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + guidance_scale * (cond - uncond)``, fused.

    ``uncond`` and ``cond``: the same shape, dtype (float32/float16/bfloat16) and device. Computed in
    float32; returns a new contiguous tensor in their dtype.
    """
    _checks.tensor(CFG_OP, "uncond", uncond, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(CFG_OP, "cond", cond, dtypes=_checks.FLOAT_DTYPES)
    g = _checks.real_number(CFG_OP, "guidance_scale", guidance_scale)
    _checks.same_device(CFG_OP, "uncond", uncond, cond=cond)
    _checks.same_shape(CFG_OP, "uncond", uncond, cond=cond)
    if cond.dtype != uncond.dtype:
        raise TypeError(f"{CFG_OP}: cond has dtype {cond.dtype} but uncond has dtype {uncond.dtype}")
    return _cfg_dispatch(uncond, cond, g, device=uncond.device, dtype=uncond.dtype)


def scheduler_step(sample: torch.Tensor, model_output: torch.Tensor, coefs: torch.Tensor, *,
                   model_output_uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
                   noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   add_noise: bool = True) -> torch.Tensor:
    """One fused diffusion scheduler step (the formula and the coefficient layout: module docstring).

    Args:
        sample: x_t, any shape, float32/float16/bfloat16.
        model_output: the model's prediction for ``sample`` (same shape, dtype and device); with
            ``model_output_uncond`` it is the conditional prediction and guidance is fused in.
        coefs: float32 [11] on ``sample``'s device, laid out as ``COEFS``.
        model_output_uncond, guidance_scale: classifier-free guidance, ``uncond + g * (cond - uncond)``.
        noise: the noise of the SIGMA term (same shape and device as ``sample``, any float dtype), or
            None to draw it inside the kernel from genfast's Philox stream, seeded from ``generator``.
        add_noise: False drops the SIGMA term and draws nothing (a deterministic step).
    Returns:
        x_{t-1}: a new contiguous tensor of ``sample``'s shape and dtype.
    """
    op = STEP_OP
    check_step_inputs(op, sample, model_output, model_output_uncond)
    _checks.tensor(op, "coefs", coefs, dtypes=(torch.float32,), ndim=1)
    if coefs.numel() != NUM_COEFS:
        raise ValueError(f"{op}: coefs must hold {NUM_COEFS} values ({', '.join(COEFS)}), got {coefs.numel()}")
    _checks.same_device(op, "sample", sample, coefs=coefs)
    g = _checks.real_number(op, "guidance_scale", guidance_scale)
    if add_noise:
        noise, seed = _checks.noise_or_seed(op, sample, noise, generator)
    else:
        if noise is not None or generator is not None:
            raise ValueError(f"{op}: add_noise=False takes neither noise nor generator")
        seed = None
    return run_step(sample, model_output, model_output_uncond, g, coefs.contiguous(), noise, seed)


__all__ = ["scheduler_step", "scheduler_step_ref", "cfg_combine", "cfg_combine_ref", "COEFS", "NUM_COEFS"]
