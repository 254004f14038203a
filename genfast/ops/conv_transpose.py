"""Fused transposed convolution: conv_transpose2d (and 1d) with a per-channel scale/shift and activation.

    out = act((conv_transpose(x, weight) + bias) * scale + shift)

``scale``/``shift`` are a BatchNorm in eval mode folded to two per-output-channel vectors
(scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale); activation is one of
ACTIVATIONS (None, "relu", "leaky_relu", "tanh", "sigmoid", "silu", "gelu": exact, erf form), the one list of
them that the nn modules, genfast.fuse and the kernels' codes all follow.

- ``conv_transpose2d_ref``: the spec (torch's conv_transpose2d in fp32 + the epilogue), differentiable by
  ordinary autograd. CPU tensors run it under ``auto`` (genfast has no CPU kernel: torch's is the one to beat).
- ``genfast::conv_transpose2d_triton``: the Triton kernel (genfast/kernels/conv_transpose.py), returning
  (out, pre) where pre = conv + bias is kept for the backward when gradients are needed.
- Backward (register_autograd): the epilogue's derivative is one fused Triton elementwise/reduction kernel
  (``genfast::conv_transpose2d_epilogue_backward_triton``: dpre, dscale, dshift; dbias = scale * dshift);
  dx and dweight come from torch's own ``aten.convolution_backward`` on dpre for now (not a genfast kernel).
- ``genfast::conv_transpose2d``: the CUDA C++ kernel (csrc/cuda/conv_transpose.cu; schema in csrc/genfast.cpp,
  the Triton twin's signature), served when the "cuda" backend is named. Same phase decomposition, tensor cores
  (WMMA) for fp16/bf16 and exact fp32 FMAs for fp32; its backward is the same autograd as the Triton op's (the
  Triton epilogue backward, then torch's convolution_backward). ``auto`` on CUDA tensors prefers Triton: its
  kernel compiles to wgmma fed by a multi-stage cp.async pipeline on sm_90a, where the C++ kernel issues mma.sync
  from single-buffered synchronous loads (the SASS comparison is in csrc/cuda/conv_transpose.cu), so the C++
  kernel is a secondary path; it has been compiled for sm_90a/sm_80 but not yet run on a GPU.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from genfast import _backend, _ext
from genfast.ops import _checks

OP = "conv_transpose2d"
_GRID_LIMIT = 65535  # CUDA grid axes 1 and 2 carry the phases and the groups


# ------------------------------------------------------------------------------------------- activations
class Activation(NamedTuple):
    """One fused activation as torch computes it: its module, and the function out of place and in place."""

    module: type[nn.Module]
    apply: Callable[[torch.Tensor, float], torch.Tensor]  # (y, negative_slope) -> act(y)
    apply_: Callable[[torch.Tensor, float], torch.Tensor]  # the same, overwriting y (no autograd wanted)


# The one list of fused activations. A name's position in ACTIVATIONS is its code in the kernels: the Triton
# kernel's ACTIVATION constexpr and csrc/cuda/conv_transpose.cuh's ConvActivation mirror this order (a test
# checks both). None is the identity, spelled "none" inside the custom ops. gelu is the exact (erf) form.
ACTIVATION_TABLE: dict[str, Activation] = {
    "relu": Activation(nn.ReLU, lambda y, slope: F.relu(y), lambda y, slope: y.relu_()),
    "leaky_relu": Activation(nn.LeakyReLU, F.leaky_relu, F.leaky_relu_),
    "tanh": Activation(nn.Tanh, lambda y, slope: torch.tanh(y), lambda y, slope: y.tanh_()),
    "sigmoid": Activation(nn.Sigmoid, lambda y, slope: torch.sigmoid(y), lambda y, slope: y.sigmoid_()),
    "silu": Activation(nn.SiLU, lambda y, slope: F.silu(y), lambda y, slope: F.silu(y, inplace=True)),
    "gelu": Activation(nn.GELU, lambda y, slope: F.gelu(y), lambda y, slope: F.gelu(y)),
}
ACTIVATIONS: tuple[str | None, ...] = (None, *ACTIVATION_TABLE)
ACTIVATION_CODES: dict[str, int] = {name or "none": code for code, name in enumerate(ACTIVATIONS)}


def activate(y: torch.Tensor, activation: str | None, negative_slope: float = 0.01, *,
             inplace: bool = False) -> torch.Tensor:
    """The epilogue's activation in plain torch (None/"none" is the identity); ``inplace`` overwrites y."""
    if activation in (None, "none"):
        return y
    entry = ACTIVATION_TABLE.get(activation) if isinstance(activation, str) else None
    if entry is None:
        raise ValueError(f"unknown activation {activation!r}")
    return (entry.apply_ if inplace else entry.apply)(y, negative_slope)


def conv_transpose_output_size(size: int, kernel: int, stride: int, padding: int, output_padding: int,
                               dilation: int) -> int:
    """Output length along one spatial axis, torch's formula (< 1 for arguments _check refuses)."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


# ------------------------------------------------------------------------------------------- reference
def conv_transpose2d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1,
                         padding=0, output_padding=0, groups: int = 1, dilation=1, *,
                         scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                         activation: str | None = None, negative_slope: float = 0.01) -> torch.Tensor:
    """act((F.conv_transpose2d(x, weight, bias, ...) * scale + shift)), computed in (at least) fp32, in x's dtype.

    Also serves 1-D inputs (x [N, C, L], weight [C_in, C_out/groups, K]) through F.conv_transpose1d.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    conv = F.conv_transpose1d if x.dim() in (2, 3) and weight.dim() == 3 else F.conv_transpose2d
    y = conv(x.to(compute), weight.to(compute), bias.to(compute) if bias is not None else None, stride, padding,
             output_padding, groups, dilation)
    if scale is not None or shift is not None:
        # y * scale + shift per channel, written as an eval-mode batch_norm with unit statistics (mean 0, var 1,
        # eps 0: exactly y * scale + shift): one vectorised, differentiable pass, about 2x faster on CPU than the
        # broadcast addcmul, so this path (auto on CPU) is no slower than eager conv + BatchNorm2d.
        c = y.shape[1]
        unit_mean, unit_var = y.new_zeros(c), y.new_ones(c)
        y = F.batch_norm(y, unit_mean, unit_var, scale.to(y.dtype) if scale is not None else unit_var,
                         shift.to(y.dtype) if shift is not None else unit_mean, False, 0.0, 0.0)
    return activate(y, activation, negative_slope).to(x.dtype)


# ------------------------------------------------------------------------------------------- fake impls
def _out_shape(x, weight, stride, padding, output_padding, groups, dilation):
    sizes = [conv_transpose_output_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i],
                                        output_padding[i], dilation[i]) for i in range(2)]
    return (x.shape[0], weight.shape[1] * groups, *sizes)


def _like(x: torch.Tensor, shape, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=fmt)


def _channels_last(t: torch.Tensor) -> bool:
    """Whether genfast writes results shaped like ``t`` in channels_last (else NCHW-contiguous): t's own layout."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _fwd_fake(x, weight, bias, stride, padding, output_padding, groups, dilation, scale, shift, activation,
              negative_slope, save_pre):
    shape = _out_shape(x, weight, stride, padding, output_padding, groups, dilation)
    cl = _channels_last(x)
    return _like(x, shape, cl), (_like(x, shape, cl) if save_pre else x.new_empty(0))


def _epilogue_backward_fake(grad, pre, scale, shift, activation, negative_slope):
    C = grad.shape[1]
    return (_like(grad, grad.shape, _channels_last(grad)), grad.new_empty(C, dtype=torch.float32),
            grad.new_empty(C, dtype=torch.float32))


# ------------------------------------------------------------------------------------------- Triton twins
@torch.library.custom_op("genfast::conv_transpose2d_triton", mutates_args=())
def _conv_transpose2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
                             padding: list[int], output_padding: list[int], groups: int, dilation: list[int],
                             scale: torch.Tensor | None, shift: torch.Tensor | None, activation: str,
                             negative_slope: float, save_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from genfast.kernels import conv_transpose

    out, pre = _fwd_fake(x, weight, bias, stride, padding, output_padding, groups, dilation, scale, shift, activation,
                         negative_slope, save_pre)  # allocated here: shapes and layout are decided in one place
    if out.numel():
        conv_transpose.conv_transpose2d(x, weight, bias, out, pre if save_pre else None, stride, padding, groups,
                                        dilation, scale, shift, ACTIVATION_CODES[activation], negative_slope)
    return out, pre


@torch.library.custom_op("genfast::conv_transpose2d_epilogue_backward_triton", mutates_args=())
def _epilogue_backward_triton(grad: torch.Tensor, pre: torch.Tensor | None, scale: torch.Tensor | None,
                              shift: torch.Tensor | None, activation: str,
                              negative_slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from genfast.kernels import conv_transpose

    dpre = _like(grad, grad.shape, _channels_last(grad))
    dscale, dshift = conv_transpose.epilogue_backward(grad, pre, scale, shift, ACTIVATION_CODES[activation],
                                                      negative_slope, dpre)
    return dpre, dscale, dshift


_epilogue_backward_triton.register_fake(_epilogue_backward_fake)


# ------------------------------------------------------------------------------------------- autograd
def _register(forward_name: str, epilogue_backward_name: str) -> None:
    """Fake impl and autograd of the forward op ``genfast::<forward_name>`` (the Triton or the CUDA kernel), whose
    backward runs ``genfast::<epilogue_backward_name>`` and then torch's convolution_backward."""
    forward = getattr(torch.ops.genfast, forward_name)
    epilogue_backward = getattr(torch.ops.genfast, epilogue_backward_name)
    torch.library.register_fake(f"genfast::{forward_name}")(_fwd_fake)

    def setup(ctx, inputs, output):
        (x, weight, bias, stride, padding, output_padding, groups, dilation, scale, shift, activation,
         negative_slope, save_pre) = inputs
        ctx.conv = (stride, padding, output_padding, groups, dilation)
        ctx.activation, ctx.negative_slope = activation, negative_slope
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(x, weight, bias, scale, shift, output[1] if save_pre else None)
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad, _grad_pre):
        x, weight, bias, scale, shift, pre = ctx.saved_tensors
        stride, padding, output_padding, groups, dilation = ctx.conv
        activation = ctx.activation
        need_pre = activation != "none" or (scale is not None and ctx.needs_input_grad[8])
        if need_pre and pre is None:
            # The forward ran without keeping pre (no gradient was expected then): recompute conv + bias.
            pre = forward(x, weight, bias, stride, padding, output_padding, groups, dilation, None, None, "none",
                          0.0, False)[0]
        dpre, dscale, dshift = epilogue_backward(grad, pre if need_pre else None, scale, shift, activation,
                                                 ctx.negative_slope)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # dx and dweight: torch's own convolution backward on dpre (a genfast kernel is future work).
            dx, dweight, _ = torch.ops.aten.convolution_backward(
                dpre, x, weight, None, stride, padding, dilation, True, output_padding, groups,
                [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        if bias is not None and ctx.needs_input_grad[2]:
            dbias = (dshift * scale.float() if scale is not None else dshift).to(ctx.bias_dtype)
        dscale_out = dscale.to(scale.dtype) if scale is not None and ctx.needs_input_grad[8] else None
        dshift_out = dshift.to(shift.dtype) if shift is not None and ctx.needs_input_grad[9] else None
        return dx, dweight, dbias, None, None, None, None, None, dscale_out, dshift_out, None, None, None

    torch.library.register_autograd(f"genfast::{forward_name}", backward, setup_context=setup)


_register("conv_transpose2d_triton", "conv_transpose2d_epilogue_backward_triton")
# The CUDA C++ forward's schema comes with the extension (csrc/genfast.cpp); an extension built before it existed
# lacks it. Its backward reuses the Triton epilogue backward (Triton is present wherever CUDA kernels run).
CUDA_OP_LOADED = _ext.loaded and hasattr(torch.ops.genfast, "conv_transpose2d")
if CUDA_OP_LOADED:
    _register("conv_transpose2d", "conv_transpose2d_epilogue_backward_triton")


# ------------------------------------------------------------------------------------------- dispatch
def _reference(x, weight, bias, stride, padding, output_padding, groups, dilation, scale, shift, activation,
               negative_slope, save_pre):
    return conv_transpose2d_ref(x, weight, bias, stride, padding, output_padding, groups, dilation, scale=scale,
                                shift=shift, activation=activation, negative_slope=negative_slope)


def _grid_supports(kernel: str, dtype, groups: int, phases: int) -> str | None:
    """Why the Triton or CUDA kernel (``kernel``) cannot take this call, or None: both share these limits."""
    if dtype is not None and dtype not in _checks.FLOAT_DTYPES:
        return f"the {kernel} kernel takes float32/float16/bfloat16, not {dtype}"
    if groups > _GRID_LIMIT or phases > _GRID_LIMIT:
        return f"groups and stride_h * stride_w must be at most {_GRID_LIMIT} (a CUDA grid axis)"
    return None


def _triton_supports(device, dtype, groups=1, phases=1, **_):
    return _grid_supports("Triton", dtype, groups, phases)


def _cuda_supports(device, dtype, groups=1, phases=1, **_):
    if not CUDA_OP_LOADED:
        return "the compiled extension predates genfast::conv_transpose2d (rebuild it)"
    return _grid_supports("CUDA", dtype, groups, phases)


def _cpu_folded(x, weight, bias, stride, padding, output_padding, groups, dilation, scale, shift, activation,
                negative_slope, save_pre):
    """The CPU backend: torch's (oneDNN) transposed convolution with the epilogue folded into it.

    The per-channel scale multiplies the weight's output channels and scale/shift fold into the bias, so
    act(conv(x, w * scale, bias * scale + shift)) costs one convolution plus one activation pass, where eager
    conv + BatchNorm2d + activation costs three passes over the output. Autograd flows through the fold (the
    weight is small), and the activation runs in place when no gradient is wanted. float32 only: the low
    precisions take the reference, which computes in float32.
    """
    w, b = weight, bias
    out_numel = math.prod(_out_shape(x, weight, stride, padding, output_padding, groups, dilation))
    if (scale is not None or shift is not None) and weight.numel() >= out_numel:
        # A weight larger than the output (a layer from a 1x1 latent): scaling the output is the cheaper pass.
        y = conv_transpose2d_ref(x, weight, bias, stride, padding, output_padding, groups, dilation, scale=scale,
                                 shift=shift)
        return activate(y, activation, negative_slope, inplace=not _needs_grad(x, weight, bias, scale, shift))
    if scale is not None or shift is not None:
        c_out = weight.shape[1] * groups
        s = scale.to(weight.dtype) if scale is not None else weight.new_ones(c_out)
        # weight [C_in, C_out/groups, kh, kw]: output channel o = g * (C_out/groups) + j sits at rows of group g.
        cin_g = weight.shape[0] // groups
        w = (weight.view(groups, cin_g, weight.shape[1], *weight.shape[2:])
             * s.view(groups, 1, weight.shape[1], *([1] * (weight.dim() - 2)))).reshape(weight.shape)
        b = bias * s if bias is not None else None
        if shift is not None:
            b = shift.to(weight.dtype) if b is None else b + shift.to(weight.dtype)
    y = F.conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation)
    return activate(y, activation, negative_slope, inplace=not _needs_grad(x, weight, bias, scale, shift))


def _cpu_supports(device, dtype, **_):
    if dtype is not None and dtype != torch.float32:
        return f"the CPU path folds the epilogue in float32 only, not {dtype} (the reference computes in float32)"
    return None


# auto prefers Triton on CUDA tensors until the C++ kernel has been verified and benchmarked on a GPU; "cuda" by
# name runs the C++ kernel.
_dispatch = _backend.dispatcher(OP, _reference, preference={"cuda": ("triton", "cuda"), "cpu": ("cpu",)})
_dispatch.register("triton", supports=_triton_supports)(
    lambda *args: torch.ops.genfast.conv_transpose2d_triton(*args)[0])
_dispatch.register("cuda", supports=_cuda_supports)(lambda *args: torch.ops.genfast.conv_transpose2d(*args)[0])
_dispatch.register("cpu", supports=_cpu_supports)(_cpu_folded)


# ------------------------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class ConvSpec:
    """A validated call's hyper-parameters: per spatial axis (1 or 2 of them) stride, padding, output_padding and
    dilation; groups; the activation's name ("none" for None) and negative_slope."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    activation: str
    negative_slope: float

    def as_2d(self) -> "ConvSpec":
        """The same call as a 2-D one with a unit leading axis (how conv_transpose1d runs: H = 1)."""
        if len(self.stride) == 2:
            return self
        return replace(self, stride=(1, *self.stride), padding=(0, *self.padding),
                       output_padding=(0, *self.output_padding), dilation=(1, *self.dilation))

    def conv_args(self) -> tuple:
        """(stride, padding, output_padding, groups, dilation): torch's positional order, lists as the ops take."""
        return list(self.stride), list(self.padding), list(self.output_padding), self.groups, list(self.dilation)


def _tuple(op: str, name: str, value, n: int, minimum: int) -> tuple[int, ...]:
    """An int or a sequence of n ints, each >= minimum, as a tuple of n ints."""
    items = [value] * n if not isinstance(value, (tuple, list)) else list(value)
    if len(items) != n or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in items):
        raise TypeError(f"{op}: {name} must be an int or a sequence of {n} ints, got {value!r}")
    items = [int(v) for v in items]
    if any(v < minimum for v in items):
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value!r}")
    return tuple(items)


def _check(op: str, x, weight, bias, stride, padding, output_padding, groups, dilation, scale, shift,
           activation, negative_slope, spatial: int) -> ConvSpec:
    """Validate a conv_transpose{1,2}d call (``spatial`` is 1 or 2; x is batched here: [N, C, *spatial])."""
    _checks.tensor(op, "x", x, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor(op, "weight", weight, dtypes=_checks.FLOAT_DTYPES, ndim=2 + spatial)
    if x.dim() != 2 + spatial:
        raise ValueError(f"{op}: x must be {1 + spatial}-D (unbatched) or {2 + spatial}-D [N, C_in, ...], got shape "
                         f"{tuple(x.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{op}: weight has dtype {weight.dtype} but x has dtype {x.dtype}")
    if bias is not None:
        _checks.tensor(op, "bias", bias, dtypes=_checks.FLOAT_DTYPES, ndim=1)
    for name, vec in (("scale", scale), ("shift", shift)):
        # Any float dtype (float64 included): the kernels read them as float32, as BatchNorm's fp32 buffers are.
        if vec is not None:
            _checks.tensor(op, name, vec, ndim=1)
            if not vec.is_floating_point():
                raise TypeError(f"{op}: {name} must have a floating-point dtype, got {vec.dtype}")
    _checks.same_device(op, "x", x, weight=weight, bias=bias, scale=scale, shift=shift)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    groups = int(groups)
    c_in = x.shape[1]
    if weight.shape[0] != c_in:
        raise ValueError(f"{op}: weight must be [C_in={c_in}, C_out/groups, {', '.join(['k'] * spatial)}], got shape "
                         f"{tuple(weight.shape)} (weight.shape[0] must equal x.shape[1])")
    if c_in % groups:
        raise ValueError(f"{op}: in_channels ({c_in}) must be divisible by groups ({groups})")
    if min(weight.shape) < 1:
        raise ValueError(f"{op}: weight must have no empty dimension, got shape {tuple(weight.shape)}")
    if min(x.shape[1:]) < 1:
        raise ValueError(f"{op}: x must have channels and a non-empty image, got shape {tuple(x.shape)}")
    c_out = weight.shape[1] * groups
    for name, vec in (("bias", bias), ("scale", scale), ("shift", shift)):
        if vec is not None and vec.shape[0] != c_out:
            raise ValueError(f"{op}: {name} must have C_out = {c_out} elements, got shape {tuple(vec.shape)}")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"{op}: bias has dtype {bias.dtype} but x has dtype {x.dtype}")
    stride = _tuple(op, "stride", stride, spatial, 1)
    padding = _tuple(op, "padding", padding, spatial, 0)
    output_padding = _tuple(op, "output_padding", output_padding, spatial, 0)
    dilation = _tuple(op, "dilation", dilation, spatial, 1)
    for i in range(spatial):
        if output_padding[i] >= max(stride[i], dilation[i]):
            raise ValueError(f"{op}: output_padding must be smaller than either stride or dilation, got "
                             f"output_padding={output_padding}, stride={stride}, dilation={dilation}")
        size = conv_transpose_output_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i],
                                          output_padding[i], dilation[i])
        if size < 1:
            raise ValueError(f"{op}: the output would be empty (size {size} along spatial dim {i}): padding "
                             f"{padding} is too large for input {tuple(x.shape[2:])} and kernel "
                             f"{tuple(weight.shape[2:])}")
    if isinstance(activation, bool) or activation not in ACTIVATIONS:
        names = ", ".join(repr(a) for a in ACTIVATIONS)
        raise ValueError(f"{op}: activation must be one of {names}, got {activation!r}")
    negative_slope = _checks.real_number(op, "negative_slope", negative_slope)
    return ConvSpec(stride, padding, output_padding, dilation, groups, activation or "none", negative_slope)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _run(x, weight, bias, scale, shift, spec: ConvSpec) -> torch.Tensor:
    """The 2-D call, x [N, C_in, H, W] with N >= 1, through the backend dispatcher."""
    # pre = conv + bias is kept only when a backward will need it (the activation's or dscale's input).
    save_pre = _needs_grad(x, weight, bias, scale, shift) and (spec.activation != "none" or scale is not None)
    facts = {"groups": spec.groups, "phases": spec.stride[0] * spec.stride[1]}
    return _dispatch(x, weight, bias, *spec.conv_args(), scale, shift, spec.activation, spec.negative_slope,
                     save_pre, device=x.device, dtype=x.dtype, facts=facts)


# ------------------------------------------------------------------------------------------- public ops
def _autocast(x, weight, bias):
    """Under torch.autocast, cast x, weight and bias to the autocast dtype, as autocast does for torch's own
    conv_transpose (a lower-precision op); scale and shift may stay float32 (the kernels take any float dtype)."""
    device_type = x.device.type if isinstance(x, torch.Tensor) else None
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return cast(x), cast(weight), cast(bias)


def _conv_transpose(op: str, spatial: int, x, weight, bias, stride, padding, output_padding, groups, dilation,
                    scale, shift, activation, negative_slope) -> torch.Tensor:
    """The body of conv_transpose1d (``spatial`` 1: run as 2-D with H = 1) and conv_transpose2d (2)."""
    x, weight, bias = _autocast(x, weight, bias)
    unbatched = isinstance(x, torch.Tensor) and x.dim() == 1 + spatial
    if unbatched:
        x = x.unsqueeze(0)
    spec = _check(op, x, weight, bias, stride, padding, output_padding, groups, dilation, scale, shift, activation,
                  negative_slope, spatial)
    if x.shape[0] == 0:
        stride, padding, output_padding, groups, dilation = spec.conv_args()
        out = conv_transpose2d_ref(x, weight, bias, stride, padding, output_padding, groups, dilation, scale=scale,
                                   shift=shift, activation=spec.activation, negative_slope=spec.negative_slope)
    elif spatial == 1:
        out = _run(x.unsqueeze(2), weight.unsqueeze(2), bias, scale, shift, spec.as_2d()).squeeze(2)
    else:
        out = _run(x, weight, bias, scale, shift, spec)
    return out.squeeze(0) if unbatched else out


def conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
                     output_padding=0, groups: int = 1, dilation=1, *, scale: torch.Tensor | None = None,
                     shift: torch.Tensor | None = None, activation: str | None = None,
                     negative_slope: float = 0.01) -> torch.Tensor:
    """torch.nn.functional.conv_transpose2d with a fused epilogue: act((conv + bias) * scale + shift).

    x: [N, C_in, H, W] or unbatched [C_in, H, W], NCHW or channels_last; weight: [C_in, C_out/groups, KH, KW];
    bias, scale, shift: [C_out] or None. x, weight and bias share one dtype (float32/float16/bfloat16) and
    device; scale and shift may be any float dtype (fp32 BatchNorm buffers, float64 too; read as float32).
    stride, padding, output_padding, dilation: an int or a pair, with torch's rules (padding >= 0,
    output_padding < max(stride, dilation)).
    activation: None, "relu", "leaky_relu" (negative_slope), "tanh", "sigmoid", "silu" or "gelu" (ACTIVATIONS).
    Returns [N, C_out, OH, OW] (OH = (H-1)*stride - 2*padding + dilation*(KH-1) + output_padding + 1) in x's
    dtype and memory format. Differentiable in x, weight, bias, scale and shift.
    """
    return _conv_transpose("conv_transpose2d", 2, x, weight, bias, stride, padding, output_padding, groups, dilation,
                           scale, shift, activation, negative_slope)


def conv_transpose1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
                     output_padding=0, groups: int = 1, dilation=1, *, scale: torch.Tensor | None = None,
                     shift: torch.Tensor | None = None, activation: str | None = None,
                     negative_slope: float = 0.01) -> torch.Tensor:
    """torch.nn.functional.conv_transpose1d with the same fused epilogue, run by the 2-D kernel with H = 1.

    x: [N, C_in, L] or unbatched [C_in, L]; weight: [C_in, C_out/groups, K]; the rest as conv_transpose2d
    (ints or 1-sequences). Returns [N, C_out, L_out] in x's dtype.
    """
    return _conv_transpose("conv_transpose1d", 1, x, weight, bias, stride, padding, output_padding, groups, dilation,
                           scale, shift, activation, negative_slope)


__all__ = ["conv_transpose2d", "conv_transpose2d_ref", "conv_transpose1d", "ACTIVATIONS"]
