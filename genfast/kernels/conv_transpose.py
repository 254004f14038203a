"""Triton kernels of genfast::conv_transpose2d_triton and its epilogue backward.

Forward: a stride-(sh, sw) transposed convolution is split into sh * sw *phases* by the output position
modulo the stride. Output row ``oh = ph + sh * j`` receives input row ``ih`` through tap ``kh`` only when
``oh + pad - kh * dil = ih * sh``, i.e. when ``kh * dil = ph + pad (mod sh)``. Those taps form the arithmetic
progression ``kh0, kh0 + step, ...`` with ``step = sh / gcd(sh, dil)``, and every one of them reads
``ih = j + (ph + pad - kh * dil) / sh`` (an exact division). So each phase is a dense, stride-1 implicit GEMM
over its own taps: M = N * OHp * OWp output pixels, N = C_out / groups channels, K = (C_in / groups) * taps.
Nothing is zero-inserted and no multiply-add of a tap that cannot contribute is issued; the only masked work
is at the image border, as in any implicit GEMM. One launch covers every phase (grid axis 1) and group
(axis 2). The epilogue adds the bias, optionally saves that pre-epilogue value (for the backward), then
applies ``* scale + shift`` per output channel and the activation before the single store.

Layouts: every tensor is addressed through its four strides, so NCHW and channels_last inputs both work;
the output is allocated in the input's layout. Offsets are int64. fp16/bf16 run the dot in their own
precision with fp32 accumulation; fp32 uses TF32 exactly when torch's cuDNN convolutions would
(``torch.backends.cudnn.allow_tf32``), so genfast and eager torch are compared like for like.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from genfast import _backend

# Activation codes shared with genfast/ops/conv_transpose.py.
ACTIVATIONS = {"none": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4, "silu": 5, "gelu": 6}

_INV_SQRT2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _activate(z, negative_slope, ACTIVATION: tl.constexpr):
    """The epilogue's activation on fp32 ``z`` (codes as in ACTIVATIONS; gelu is the exact, erf form)."""
    if ACTIVATION == 1:
        z = tl.where(z > 0, z, 0.0)
    elif ACTIVATION == 2:
        z = tl.where(z > 0, z, z * negative_slope)
    elif ACTIVATION == 3:
        # tanh(z) = 2 sigmoid(2z) - 1; exp(-2z) overflowing to inf gives -1 exactly, as it should.
        z = 2.0 * _sigmoid(2.0 * z) - 1.0
    elif ACTIVATION == 4:
        z = _sigmoid(z)
    elif ACTIVATION == 5:
        z = z * _sigmoid(z)
    elif ACTIVATION == 6:
        z = 0.5 * z * (1.0 + tl.math.erf(z * _INV_SQRT2))
    return z


@triton.jit
def _activate_grad(z, negative_slope, ACTIVATION: tl.constexpr):
    """d activation / dz at fp32 ``z``, with torch's conventions at the kinks (relu'(0) = 0, leaky'(0) = slope)."""
    if ACTIVATION == 0:
        d = tl.full(z.shape, 1.0, tl.float32)
    elif ACTIVATION == 1:
        d = tl.where(z > 0, 1.0, 0.0)
    elif ACTIVATION == 2:
        d = tl.where(z > 0, 1.0, negative_slope)
    elif ACTIVATION == 3:
        t = 2.0 * _sigmoid(2.0 * z) - 1.0
        d = 1.0 - t * t
    elif ACTIVATION == 4:
        s = _sigmoid(z)
        d = s * (1.0 - s)
    elif ACTIVATION == 5:
        s = _sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    else:
        d = 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT2)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    return d


@triton.jit
def _first_tap(phase, pad, dil, stride, step, K):
    """(kh0, count): the taps of output phase ``phase`` along one axis are kh0 + t * step, t < count."""
    r = (phase + pad) % stride
    kh0 = K  # K means "no tap"; a solution of kh * dil = r (mod stride), if any, lies in [0, step)
    for kk in range(0, step):
        hit = ((kk * dil) % stride) == r
        kh0 = tl.minimum(kh0, tl.where(hit, kk, K))
    count = tl.where(kh0 < K, (K - kh0 + step - 1) // step, 0)
    return kh0, count


@triton.jit
def _conv_transpose_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, out_ptr, pre_ptr,
    N, H, W, C_in_g, C_out_g, OH, OW, KH, KW,
    sxn, sxc, sxh, sxw,
    swi, swo, swh, sww,
    son, soc, soh, sow,
    spn, spc, sph, spw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, step_h, step_w,
    negative_slope,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SAVE_PRE: tl.constexpr,
    ACTIVATION: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    phase = tl.program_id(1)
    group = tl.program_id(2)
    ph_h = phase // stride_w
    ph_w = phase % stride_w

    # This phase's output grid: oh = ph_h + stride_h * jh for jh < OHp (OHp is 0 when ph_h >= OH).
    OHp = tl.maximum((OH - ph_h + stride_h - 1) // stride_h, 0)
    OWp = tl.maximum((OW - ph_w + stride_w - 1) // stride_w, 0)
    P = OHp * OWp
    M = N * P
    n_tiles = tl.cdiv(C_out_g, BLOCK_N)
    pid_m = pid // n_tiles
    pid_n = pid % n_tiles

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < M
    P_safe = tl.maximum(P, 1)
    OWp_safe = tl.maximum(OWp, 1)
    n = (rows // P_safe).to(tl.int64)
    rem = rows % P_safe
    jh = rem // OWp_safe
    jw = rem % OWp_safe

    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = co < C_out_g
    ck = tl.arange(0, BLOCK_K)

    kh0, count_h = _first_tap(ph_h, pad_h, dil_h, stride_h, step_h, KH)
    kw0, count_w = _first_tap(ph_w, pad_w, dil_w, stride_w, step_w, KW)
    # Tiles past this phase's last pixel (phases differ in size by one row/column) do no work.
    count_h = tl.where(pid_m * BLOCK_M < M, count_h, 0)

    x_base = x_ptr + n * sxn + (group * C_in_g).to(tl.int64) * sxc
    w_base = w_ptr + (group * C_in_g).to(tl.int64) * swi + co.to(tl.int64)[None, :] * swo

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for th in range(0, count_h):
        kh = kh0 + th * step_h
        ih = jh + (ph_h + pad_h - kh * dil_h) // stride_h  # exact division: kh was chosen so that it is
        valid_h = mask_m & (ih >= 0) & (ih < H)
        for tw in range(0, count_w):
            kw = kw0 + tw * step_w
            iw = jw + (ph_w + pad_w - kw * dil_w) // stride_w
            valid = valid_h & (iw >= 0) & (iw < W)
            x_rows = x_base + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            w_tap = w_base + kh.to(tl.int64) * swh + kw.to(tl.int64) * sww
            for c0 in range(0, C_in_g, BLOCK_K):
                c = c0 + ck
                mask_k = c < C_in_g
                a = tl.load(x_rows[:, None] + c.to(tl.int64)[None, :] * sxc,
                            mask=valid[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(w_tap + c.to(tl.int64)[:, None] * swi, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                if DOT_FP32:
                    acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=INPUT_PRECISION)
                else:
                    acc += tl.dot(a, b, input_precision=INPUT_PRECISION)

    co_g = (group * C_out_g + co).to(tl.int64)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co_g, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    oh = (ph_h + jh * stride_h).to(tl.int64)
    ow = (ph_w + jw * stride_w).to(tl.int64)
    mask = mask_m[:, None] & mask_n[None, :]
    if SAVE_PRE:
        pre_offs = (n * spn + oh * sph + ow * spw)[:, None] + (co_g * spc)[None, :]
        tl.store(pre_ptr + pre_offs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + co_g, mask=mask_n, other=1.0)[None, :]
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + co_g, mask=mask_n, other=0.0)[None, :]
    acc = _activate(acc, negative_slope, ACTIVATION)
    out_offs = (n * son + oh * soh + ow * sow)[:, None] + (co_g * soc)[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _fwd_configs() -> list[triton.Config]:
    configs = []
    for bm, bn, bk, warps, stages in [
        (128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4),
        (128, 128, 64, 8, 3), (64, 64, 64, 4, 3), (128, 32, 32, 4, 4), (32, 64, 32, 2, 4),
        (64, 32, 16, 2, 4), (32, 32, 16, 2, 2),
    ]:
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps,
                                     num_stages=stages))
    return configs


# Autotuning only where there is a GPU to tune on: the interpreter runs one small fixed config.
_fwd_tuned = triton.autotune(
    _fwd_configs(),
    key=["N", "H", "W", "C_in_g", "C_out_g", "KH", "KW", "stride_h", "stride_w", "sxc", "son"],
)(_conv_transpose_fwd_kernel)
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}


def output_channels_last(t: torch.Tensor) -> bool:
    """Whether genfast writes results shaped like ``t`` in channels_last (else NCHW-contiguous)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def output_size(size: int, kernel: int, stride: int, padding: int, output_padding: int, dilation: int) -> int:
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def _empty(shape, like: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, device=like.device, dtype=dtype, memory_format=fmt)


def conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
                     output_padding, groups: int, dilation, scale: torch.Tensor | None, shift: torch.Tensor | None,
                     activation: str, negative_slope: float, save_pre: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, C_in, H, W], weight [C_in, C_out/groups, KH, KW] -> (out, pre), both [N, C_out, OH, OW] in x's dtype.

    ``pre`` = conv + bias (before scale/shift/activation) when ``save_pre``, else an empty tensor.
    Arguments are validated by genfast.ops.conv_transpose2d; this is the launcher.
    """
    N, C_in, H, W = x.shape
    _, C_out_g, KH, KW = weight.shape
    C_out = C_out_g * groups
    OH = output_size(H, KH, stride[0], padding[0], output_padding[0], dilation[0])
    OW = output_size(W, KW, stride[1], padding[1], output_padding[1], dilation[1])
    channels_last = output_channels_last(x)
    out = _empty((N, C_out, OH, OW), x, x.dtype, channels_last)
    pre = _empty((N, C_out, OH, OW), x, x.dtype, channels_last) if save_pre else x.new_empty(0)
    if out.numel() == 0:
        return out, pre
    on_gpu = x.device.type == "cuda"
    if on_gpu:
        # [KH, KW, C_in, C_out_g]: the B tile's channel rows become contiguous. A small copy per call.
        w = weight.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    else:
        w = weight
    f32 = lambda t: t.to(torch.float32).contiguous() if t is not None else x  # noqa: E731 (x: unused pointer)
    pre_arg = pre if save_pre else out
    # "ieee" only where it means something (fp32 operands); fp16/bf16 dots keep the tensor-core default.
    ieee = x.dtype == torch.float32 and not (on_gpu and torch.backends.cudnn.allow_tf32)
    steps = [s // math.gcd(s, d) for s, d in zip(stride, dilation)]
    args = (
        x, w, bias if bias is not None else x, f32(scale), f32(shift), out, pre_arg,
        N, H, W, C_in // groups, C_out_g, OH, OW, KH, KW,
        *x.stride(), *w.stride(), *out.stride(), *pre_arg.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], steps[0], steps[1],
        float(negative_slope),
    )
    flags = dict(HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
                 SAVE_PRE=save_pre, ACTIVATION=ACTIVATIONS[activation],
                 DOT_FP32=_backend.TRITON_INTERPRET or not on_gpu,  # the interpreter's bf16 dot is wrong
                 INPUT_PRECISION="ieee" if ieee else "tf32")
    m_max = N * triton.cdiv(OH, stride[0]) * triton.cdiv(OW, stride[1])

    def grid(meta):
        return (triton.cdiv(m_max, meta["BLOCK_M"]) * triton.cdiv(C_out_g, meta["BLOCK_N"]),
                stride[0] * stride[1], groups)

    if on_gpu and not _backend.TRITON_INTERPRET:
        _fwd_tuned[grid](*args, **flags)
    else:
        _conv_transpose_fwd_kernel[grid(_INTERPRETER_BLOCKS)](*args, **flags, **_INTERPRETER_BLOCKS)
    return out, pre


# ------------------------------------------------------------------------------------------- backward
@triton.jit
def _epilogue_bwd_kernel(
    g_ptr, pre_ptr, scale_ptr, shift_ptr, dpre_ptr, dscale_part_ptr, dshift_part_ptr,
    R, C, HW, W,
    sgn, sgc, sgh, sgw,
    spn, spc, sph, spw,
    sdn, sdc, sdh, sdw,
    negative_slope,
    HAS_PRE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One [BLOCK_C channels, BLOCK_R pixels] tile of y = act(pre * scale + shift)'s backward.

    dpre = g * act'(z) * scale; per tile, the channel sums of dz = g * act'(z) (for dshift and dbias) and of
    dz * pre (for dscale) go to row ``pid_r`` of the partial-sum buffers, summed afterwards in a fixed order
    (deterministic, unlike atomics).
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = r < R
    mask_c = c < C
    n = (r // HW).to(tl.int64)
    hw = r % HW
    h = (hw // W).to(tl.int64)
    w = (hw % W).to(tl.int64)
    c64 = c.to(tl.int64)
    mask = mask_c[:, None] & mask_r[None, :]

    g = tl.load(g_ptr + (c64 * sgc)[:, None] + (n * sgn + h * sgh + w * sgw)[None, :], mask=mask, other=0.0)
    g = g.to(tl.float32)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + c64, mask=mask_c, other=1.0)
    else:
        scale = tl.full((BLOCK_C,), 1.0, tl.float32)
    if HAS_PRE:
        pre = tl.load(pre_ptr + (c64 * spc)[:, None] + (n * spn + h * sph + w * spw)[None, :], mask=mask, other=0.0)
        pre = pre.to(tl.float32)
        z = pre * scale[:, None]
        if HAS_SHIFT:
            z += tl.load(shift_ptr + c64, mask=mask_c, other=0.0)[:, None]
        dz = g * _activate_grad(z, negative_slope, ACTIVATION)
        dz = tl.where(mask, dz, 0.0)
        tl.store(dscale_part_ptr + pid_r.to(tl.int64) * C + c64, tl.sum(dz * pre, axis=1), mask=mask_c)
    else:
        dz = g
    tl.store(dshift_part_ptr + pid_r.to(tl.int64) * C + c64, tl.sum(dz, axis=1), mask=mask_c)
    dpre = dz * scale[:, None]
    tl.store(dpre_ptr + (c64 * sdc)[:, None] + (n * sdn + h * sdh + w * sdw)[None, :],
             dpre.to(dpre_ptr.dtype.element_ty), mask=mask)


def epilogue_backward(grad: torch.Tensor, pre: torch.Tensor | None, scale: torch.Tensor | None,
                      shift: torch.Tensor | None, activation: str,
                      negative_slope: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of out = act(pre * scale + shift) for grad, pre [N, C, H, W] (any strides).

    Returns (dpre in grad's dtype and genfast's output layout, dscale [C] fp32, dshift [C] fp32). ``pre`` may
    be None only when activation is "none": then dscale is not computed (zeros).
    """
    N, C, H, W = grad.shape
    dpre = _empty(grad.shape, grad, grad.dtype, output_channels_last(grad))
    R = N * H * W
    block_c, block_r = (32, 128) if grad.is_cuda else (16, 64)
    r_blocks = triton.cdiv(R, block_r)
    dscale_part = torch.zeros((max(r_blocks, 1), C), device=grad.device, dtype=torch.float32)
    dshift_part = torch.zeros((max(r_blocks, 1), C), device=grad.device, dtype=torch.float32)
    if grad.numel():
        f32 = lambda t: t.to(torch.float32).contiguous() if t is not None else dscale_part  # noqa: E731
        pre_arg = pre if pre is not None else grad
        _epilogue_bwd_kernel[(r_blocks, triton.cdiv(C, block_c))](
            grad, pre_arg, f32(scale), f32(shift), dpre, dscale_part, dshift_part,
            R, C, H * W, W, *grad.stride(), *pre_arg.stride(), *dpre.stride(), float(negative_slope),
            HAS_PRE=pre is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
            ACTIVATION=ACTIVATIONS[activation], BLOCK_C=block_c, BLOCK_R=block_r,
            num_warps=4,
        )
    return dpre, dscale_part.sum(0), dshift_part.sum(0)
