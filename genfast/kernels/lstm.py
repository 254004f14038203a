"""Triton kernels of genfast::lstm_cell_triton and genfast::lstm_cell_backward_triton (formulas and gate order:
genfast/ops/lstm.py).

One program per (row, block of H columns): it reads the four gate blocks of the row from both gate tensors, so each
input element is read once and each output written once; everything is computed in fp32.
"""

import torch
import triton
import triton.language as tl

_BLOCK = 256


@triton.jit
def _sigmoid(z):
    # exp(-z) overflowing to inf gives 0 exactly, as it should.
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _tanh(z):
    # tanh(z) = 2 sigmoid(2z) - 1 (Triton has no portable tanh); absolute error ~1e-7 near 0, exact +-1 far out.
    return 2.0 * _sigmoid(2.0 * z) - 1.0


@triton.jit
def _gates(xg_ptr, hg_ptr, row_offset, cols, mask, H):
    """The four activated gates (i, f, g, o) of one row's columns ``cols``, in fp32."""
    a_i = tl.load(xg_ptr + row_offset + cols, mask=mask, other=0.0).to(tl.float32) + \
        tl.load(hg_ptr + row_offset + cols, mask=mask, other=0.0).to(tl.float32)
    a_f = tl.load(xg_ptr + row_offset + H + cols, mask=mask, other=0.0).to(tl.float32) + \
        tl.load(hg_ptr + row_offset + H + cols, mask=mask, other=0.0).to(tl.float32)
    a_g = tl.load(xg_ptr + row_offset + 2 * H + cols, mask=mask, other=0.0).to(tl.float32) + \
        tl.load(hg_ptr + row_offset + 2 * H + cols, mask=mask, other=0.0).to(tl.float32)
    a_o = tl.load(xg_ptr + row_offset + 3 * H + cols, mask=mask, other=0.0).to(tl.float32) + \
        tl.load(hg_ptr + row_offset + 3 * H + cols, mask=mask, other=0.0).to(tl.float32)
    return _sigmoid(a_i), _sigmoid(a_f), _tanh(a_g), _sigmoid(a_o)


@triton.jit
def _lstm_cell_kernel(xg_ptr, hg_ptr, c_ptr, h_out_ptr, c_out_ptr, H, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: B * 4H can pass 2^31
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    i, f, g, o = _gates(xg_ptr, hg_ptr, row * 4 * H, cols, mask, H)
    c_prev = tl.load(c_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    c_new = f * c_prev + i * g
    h = o * _tanh(c_new)
    tl.store(c_out_ptr + row * H + cols, c_new.to(c_out_ptr.dtype.element_ty), mask=mask)
    tl.store(h_out_ptr + row * H + cols, h.to(h_out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lstm_cell_backward_kernel(gh_ptr, gc_ptr, xg_ptr, hg_ptr, c_ptr, dg_ptr, dc_ptr, H, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    g_row = row * 4 * H
    i, f, g, o = _gates(xg_ptr, hg_ptr, g_row, cols, mask, H)
    c_prev = tl.load(c_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    t = _tanh(f * c_prev + i * g)
    grad_h = tl.load(gh_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
    dc = tl.load(gc_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32) + grad_h * o * (1.0 - t * t)
    ty = dg_ptr.dtype.element_ty
    tl.store(dg_ptr + g_row + cols, (dc * g * i * (1.0 - i)).to(ty), mask=mask)
    tl.store(dg_ptr + g_row + H + cols, (dc * c_prev * f * (1.0 - f)).to(ty), mask=mask)
    tl.store(dg_ptr + g_row + 2 * H + cols, (dc * i * (1.0 - g * g)).to(ty), mask=mask)
    tl.store(dg_ptr + g_row + 3 * H + cols, (grad_h * t * o * (1.0 - o)).to(ty), mask=mask)
    tl.store(dc_ptr + row * H + cols, (dc * f).to(dc_ptr.dtype.element_ty), mask=mask)


def _grid(batch: int, hidden: int):
    block = min(_BLOCK, triton.next_power_of_2(max(hidden, 16)))
    return (batch, triton.cdiv(hidden, block)), block


def lstm_cell(x_gates: torch.Tensor, h_gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, hidden = c.shape
    xg, hg, cc = x_gates.contiguous(), h_gates.contiguous(), c.contiguous()
    h_out = torch.empty((batch, hidden), dtype=x_gates.dtype, device=x_gates.device)
    c_out = torch.empty((batch, hidden), dtype=c.dtype, device=c.device)
    if batch and hidden:
        grid, block = _grid(batch, hidden)
        _lstm_cell_kernel[grid](xg, hg, cc, h_out, c_out, hidden, BLOCK=block)
    return h_out, c_out


def lstm_cell_backward(grad_h: torch.Tensor, grad_c: torch.Tensor, x_gates: torch.Tensor, h_gates: torch.Tensor,
                       c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, hidden = c.shape
    d_gates = torch.empty((batch, 4 * hidden), dtype=x_gates.dtype, device=x_gates.device)
    d_c = torch.empty((batch, hidden), dtype=c.dtype, device=c.device)
    if batch and hidden:
        grid, block = _grid(batch, hidden)
        _lstm_cell_backward_kernel[grid](grad_h.contiguous(), grad_c.contiguous(), x_gates.contiguous(),
                                         h_gates.contiguous(), c.contiguous(), d_gates, d_c, hidden, BLOCK=block)
    return d_gates, d_c
