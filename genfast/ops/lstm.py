"""The fused LSTM cell: ``lstm_cell(x_gates, h_gates, c) -> (h, c_new)``.

The matrix products stay outside the op (they are GEMMs, best left to BLAS / cuBLAS): the caller passes
``x_gates = x @ W_ih.T + b_ih`` and ``h_gates = h @ W_hh.T + b_hh``, both [B, 4H] in ``torch.nn.LSTM``'s gate
order (i, f, g, o), so nn.LSTM / nn.LSTMCell weights work unchanged. The op fuses everything after them into one
pass that reads each gate once, computing in fp32 (fp64 for fp64 inputs)::

    a        = x_gates + h_gates                   split in four [B, H] blocks a_i, a_f, a_g, a_o
    i, f, o  = sigmoid(a_i), sigmoid(a_f), sigmoid(a_o)
    g        = tanh(a_g)
    c_new    = f * c + i * g
    h        = o * tanh(c_new)

``h`` has the gates' dtype; ``c_new`` has ``c``'s. With half-precision gates (fp16/bf16), ``c`` may stay fp32
(recommended: the cell state accumulates over the whole sequence, and rounding it to 8 bits of mantissa every
step drifts), or be in the gates' dtype.

Backward (one more fused pass, ``lstm_cell_backward``) recomputes the activations from the saved inputs rather
than saving five [B, H] blocks; with ``t = tanh(c_new)`` and ``dc = grad_c_new + grad_h * o * (1 - t^2)``::

    d a_i = dc * g * i (1 - i)     d a_f = dc * c * f (1 - f)     d a_g = dc * i * (1 - g^2)
    d a_o = grad_h * t * o (1 - o)                                 d c   = dc * f

and the gradient of ``x_gates`` and of ``h_gates`` is the same tensor ``d a``.

Backends: the C++ CPU kernel (csrc/cpu/lstm.cpp; fp32/fp16/bf16/fp64), Triton (genfast/kernels/lstm.py;
fp32/fp16/bf16), and the reference ``lstm_cell_ref`` (any float dtype). There is no CUDA C++ kernel: on a GPU
``auto`` runs the Triton kernel.
"""

from __future__ import annotations

import torch

from genfast import _backend, _ext
from genfast.ops import _checks

OP = "lstm_cell"
GATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp16/bf16/fp32 -> fp32, fp64 stays fp64


# ---------------------------------------------------------------------------------------------- reference
def lstm_cell_ref(x_gates: torch.Tensor, h_gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification (module docstring), in plain PyTorch: (h in the gates' dtype, c_new in c's dtype)."""
    compute = _compute_dtype(x_gates.dtype)
    a_i, a_f, a_g, a_o = (x_gates.to(compute) + h_gates.to(compute)).chunk(4, dim=1)
    c_new = torch.sigmoid(a_f) * c.to(compute) + torch.sigmoid(a_i) * torch.tanh(a_g)
    h = torch.sigmoid(a_o) * torch.tanh(c_new)
    return h.to(x_gates.dtype), c_new.to(c.dtype)


def lstm_cell_backward_ref(grad_h, grad_c, x_gates, h_gates, c) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's formula (module docstring): (d gates in the gates' dtype, d c in c's dtype)."""
    compute = _compute_dtype(x_gates.dtype)
    a_i, a_f, a_g, a_o = (x_gates.to(compute) + h_gates.to(compute)).chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(a_i), torch.sigmoid(a_f), torch.tanh(a_g), torch.sigmoid(a_o)
    c_prev = c.to(compute)
    t = torch.tanh(f * c_prev + i * g)
    gh = grad_h.to(compute)
    dc = grad_c.to(compute) + gh * o * (1 - t * t)
    d_gates = torch.cat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                         gh * t * o * (1 - o)], dim=1)
    return d_gates.to(x_gates.dtype), (dc * f).to(c.dtype)


# ---------------------------------------------------------------------------------------------- fake impls
# Kernels return new contiguous tensors whatever the inputs' strides, and the fakes say so.
def _fake(x_gates, h_gates, c):
    b, h = c.shape
    return x_gates.new_empty((b, h)), c.new_empty((b, h))


def _backward_fake(grad_h, grad_c, x_gates, h_gates, c):
    return x_gates.new_empty(x_gates.shape), c.new_empty(c.shape)


# ---------------------------------------------------------------------------------------------- Triton twins
@torch.library.custom_op("genfast::lstm_cell_triton", mutates_args=())
def _lstm_cell_triton(x_gates: torch.Tensor, h_gates: torch.Tensor,
                      c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from genfast.kernels import lstm

    return lstm.lstm_cell(x_gates, h_gates, c)


@torch.library.custom_op("genfast::lstm_cell_backward_triton", mutates_args=())
def _lstm_cell_backward_triton(grad_h: torch.Tensor, grad_c: torch.Tensor, x_gates: torch.Tensor,
                               h_gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from genfast.kernels import lstm

    return lstm.lstm_cell_backward(grad_h, grad_c, x_gates, h_gates, c)


# ---------------------------------------------------------------------------------------------- autograd
def _register(suffix: str) -> None:
    """Fake impls and autograd of ``genfast::lstm_cell{suffix}``: "" (C++, csrc) or "_triton"."""
    backward_op = getattr(torch.ops.genfast, "lstm_cell_backward" + suffix)
    torch.library.register_fake(f"genfast::lstm_cell{suffix}")(_fake)
    torch.library.register_fake(f"genfast::lstm_cell_backward{suffix}")(_backward_fake)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)  # the inputs only: the activations are recomputed in the backward

    def backward(ctx, grad_h, grad_c):
        x_gates, h_gates, c = ctx.saved_tensors
        # An output that did not reach the loss gets no gradient from autograd: zeros say the same to the kernel.
        if grad_h is None:
            grad_h = x_gates.new_zeros(c.shape)
        if grad_c is None:
            grad_c = c.new_zeros(c.shape)
        d_gates, d_c = backward_op(grad_h, grad_c, x_gates, h_gates, c)
        need = ctx.needs_input_grad
        return d_gates if need[0] else None, d_gates if need[1] else None, d_c if need[2] else None

    torch.library.register_autograd(f"genfast::lstm_cell{suffix}", backward, setup_context=setup_context)


_register("_triton")
if _ext.loaded:
    _register("")


def _cpu_supports(device, dtype=None, **_):
    return None if dtype is None or dtype in GATE_DTYPES else f"no kernel for {dtype}"


def _triton_supports(device, dtype=None, **_):
    if dtype == torch.float64:
        return "the Triton kernel computes in fp32 and has no fp64 variant (the cpu backend and the reference do)"
    return _cpu_supports(device, dtype)


_call = _checks.call_op  # one generation step of a small LSTM is tens of microseconds: skip the autograd layer


_dispatch = _backend.dispatcher(OP, lstm_cell_ref)
_dispatch.register("triton", _triton_supports)(lambda *a: _call(torch.ops.genfast.lstm_cell_triton.default, *a))
_dispatch.register("cpu", _cpu_supports)(lambda *a: _call(torch.ops.genfast.lstm_cell.default, *a))


# ---------------------------------------------------------------------------------------------- public op
def lstm_cell(x_gates: torch.Tensor, h_gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused LSTM cell step (formulas: module docstring).

    Args:
        x_gates: [B, 4H], ``x @ W_ih.T + b_ih``, gate order (i, f, g, o) as in torch.nn.LSTM; float32, float16,
            bfloat16 or float64.
        h_gates: [B, 4H], ``h @ W_hh.T + b_hh``; the same dtype and device as ``x_gates`` (any strides).
        c: [B, H], the cell state; the gates' dtype or float32 (keep it float32 with half-precision gates).
    Returns:
        (h [B, H] in the gates' dtype, c_new [B, H] in c's dtype), new contiguous tensors. Differentiable in all
        three inputs.
    """
    _checks.tensor(OP, "x_gates", x_gates, dtypes=GATE_DTYPES, ndim=2)
    _checks.tensor(OP, "h_gates", h_gates, dtypes=GATE_DTYPES, ndim=2)
    _checks.tensor(OP, "c", c, dtypes=GATE_DTYPES, ndim=2)
    _checks.same_device(OP, "x_gates", x_gates, h_gates=h_gates, c=c)
    _checks.same_shape(OP, "x_gates", x_gates, h_gates=h_gates)
    if h_gates.dtype != x_gates.dtype:
        raise TypeError(f"{OP}: h_gates has dtype {h_gates.dtype} but x_gates has dtype {x_gates.dtype}")
    batch, four_h = x_gates.shape
    if four_h % 4:
        raise ValueError(f"{OP}: x_gates must be [B, 4H] (four gates of H columns each), got shape "
                         f"{tuple(x_gates.shape)}")
    if tuple(c.shape) != (batch, four_h // 4):
        raise ValueError(f"{OP}: c must be [B, H] = [{batch}, {four_h // 4}] for x_gates of shape "
                         f"{tuple(x_gates.shape)}, got {tuple(c.shape)}")
    if c.dtype not in (x_gates.dtype, torch.float32):
        raise TypeError(f"{OP}: c must have the gates' dtype ({x_gates.dtype}) or float32, got {c.dtype}")
    return _dispatch(x_gates, h_gates, c, device=x_gates.device, dtype=x_gates.dtype)


__all__ = ["lstm_cell", "lstm_cell_ref", "lstm_cell_backward_ref"]
