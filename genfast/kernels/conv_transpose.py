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

The K loop is one loop over (tap, chunk of BLOCK_K input channels) pairs, so Triton's software pipeliner
(num_stages) overlaps the loads of step k + 1.. with the dot of step k across tap boundaries too. It needs the
A tile's rows to be runs of contiguous channels for 16-byte cp.async copies, so the launcher hands the kernel x
in channels_last (one copy of the input when it is NCHW: the input of a transposed convolution is stride_h *
stride_w times smaller than its output, which is written once either way) and the weight as
[KH, KW, C_in, C_out/groups] (output channels contiguous for the B tile). The output and pre are written through
their strides in the caller's layout (NCHW or channels_last). Offsets are int64 when some tensor has 2**31
elements or more, else int32 (half the registers). fp16/bf16 run the dot in their
own precision with fp32 accumulation; fp32 uses TF32 exactly when torch's cuDNN convolutions would
(``torch.backends.cudnn.allow_tf32``), so genfast and eager torch are compared like for like.

Activation codes are the positions in genfast.ops.conv_transpose.ACTIVATIONS (0 is the identity); the launchers
take the code, the op layer owns the names.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from genfast import _backend

# tl.constexpr: a jit function may read module globals only in this form (a plain float fails to compile on a GPU).
_INV_SQRT2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _activate(z, negative_slope, ACTIVATION: tl.constexpr):
    """The epilogue's activation on fp32 ``z`` (codes: genfast.ops.conv_transpose.ACTIVATIONS; exact gelu)."""
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
def _index(v, INDEX_64: tl.constexpr):
    """``v`` as the type element offsets are computed in: int64 only when some tensor has 2**31 elements or more
    (the launcher decides), since int64 index tensors cost registers the pipelined K loop needs."""
    if INDEX_64:
        return v.to(tl.int64)
    else:
        return v


@triton.jit
def _conv_transpose_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, out_ptr, pre_ptr,
    N, H, W, C_in_g, C_out_g, OH, OW, KH, KW,
    sxn, sxc, sxh, sxw,
    swi, swo, swh, sww,
    son, soc, soh, sow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, step_h, step_w,
    negative_slope,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, SAVE_PRE: tl.constexpr,
    ACTIVATION: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr, INDEX_64: tl.constexpr,
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
    n = _index(rows // P_safe, INDEX_64)
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
    chunks = tl.cdiv(C_in_g, BLOCK_K)

    # Row r reads x at (n, jh + dh, jw + dw) for the tap's offsets (dh, dw): its base is fixed, the tap adds a
    # scalar. Offsets stay integer vectors until the load: a 2-D pointer tensor held across the loop would pin
    # a 64-bit register per element.
    x_rows = (n * sxn + _index(jh, INDEX_64) * sxh + _index(jw, INDEX_64) * sxw
              + _index(group * C_in_g, INDEX_64) * sxc)
    w_cols = _index(co, INDEX_64) * swo
    w_group = _index(group * C_in_g, INDEX_64) * swi

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One K loop over (tap, channel chunk) pairs: tap-major, so a tap's offsets change once every `chunks` steps.
    for kk in range(0, count_h * count_w * chunks):
        tap = kk // chunks
        c0 = (kk - tap * chunks) * BLOCK_K
        kh = kh0 + (tap // count_w) * step_h
        kw = kw0 + (tap % count_w) * step_w
        dh = (ph_h + pad_h - kh * dil_h) // stride_h  # exact division: kh was chosen so that it is
        dw = (ph_w + pad_w - kw * dil_w) // stride_w
        valid = mask_m & (jh >= -dh) & (jh < H - dh) & (jw >= -dw) & (jw < W - dw)
        c = c0 + ck
        mask_k = c < C_in_g
        tap_x = _index(dh, INDEX_64) * sxh + _index(dw, INDEX_64) * sxw
        a = tl.load(x_ptr + (x_rows[:, None] + (tap_x + _index(c, INDEX_64) * sxc)[None, :]),
                    mask=valid[:, None] & mask_k[None, :], other=0.0)
        tap_w = w_group + _index(kh, INDEX_64) * swh + _index(kw, INDEX_64) * sww
        b = tl.load(w_ptr + ((tap_w + _index(c, INDEX_64) * swi)[:, None] + w_cols[None, :]),
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=INPUT_PRECISION)
        else:
            acc += tl.dot(a, b, input_precision=INPUT_PRECISION)

    co_g = _index(group * C_out_g + co, INDEX_64)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + co_g, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    oh = _index(ph_h + jh * stride_h, INDEX_64)
    ow = _index(ph_w + jw * stride_w, INDEX_64)
    mask = mask_m[:, None] & mask_n[None, :]
    out_offs = (n * son + oh * soh + ow * sow)[:, None] + (co_g * soc)[None, :]  # pre has out's strides
    if SAVE_PRE:
        tl.store(pre_ptr + out_offs, acc.to(pre_ptr.dtype.element_ty), mask=mask)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + co_g, mask=mask_n, other=1.0)[None, :]
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + co_g, mask=mask_n, other=0.0)[None, :]
    acc = _activate(acc, negative_slope, ACTIVATION)
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), pruned per call by fwd_configs_that_fit. What the rules keep
# compiles for sm_90a and sm_80 without spills, with wgmma on sm_90a for 16-bit and TF32 dots, NCHW and
# channels_last, int32 and int64 offsets (the compile gate, `make compile-gate`, checks every kept config).
FWD_CONFIGS = [
    (128, 128, 32, 8, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (128, 64, 64, 8, 3), (128, 64, 32, 4, 4),
    (64, 64, 32, 4, 4), (64, 64, 64, 4, 3), (128, 32, 32, 4, 4), (64, 32, 16, 4, 4),
]
# Shared memory per block, in bytes, on the targets genfast compiles for (sm_90: 227 KiB, sm_80: 163 KiB).
SHARED_LIMIT = {(9, 0): 227 * 1024, (8, 0): 163 * 1024}
# fp32 accumulator elements per thread a config may hold. An NCHW output is stored from the MMA layout as
# scattered elements (a phase writes every stride-th pixel), each with its own address: with 64 accumulators
# per thread that epilogue spills (measured on sm_90a), with 32 it does not; channels_last stores are vectors.
ACC_PER_THREAD_LIMIT = {"channels_last": 64, "nchw": 32}


def fwd_shared_bytes(block_m: int, block_n: int, block_k: int, stages: int, element_size: int) -> int:
    """The pipeline's shared memory: ``stages`` copies of the A [BM, BK] and B [BK, BN] tiles, plus the fp32
    [BM, BN] tile the epilogue may stage through shared memory to change layout (an upper bound)."""
    return stages * (block_m + block_n) * block_k * element_size + block_m * block_n * 4


def fwd_configs_that_fit(configs, element_size: int, shared_limit: int, out_channels_last: bool) -> list:
    """The rules behind the config list: drop a config whose buffers overflow ``shared_limit`` (it cannot
    launch) or whose accumulator tile is too large for the output layout's epilogue (it would spill)."""
    acc_limit = ACC_PER_THREAD_LIMIT["channels_last" if out_channels_last else "nchw"]
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if (fwd_shared_bytes(bm, bn, bk, c.num_stages, element_size) <= shared_limit
                and bm * bn // (32 * c.num_warps) <= acc_limit):
            kept.append(c)
    return kept


def _prune(configs, named_args, **_):
    try:
        capability = torch.cuda.get_device_capability()
    except (RuntimeError, AssertionError):  # no GPU (a compile check): keep what fits every target
        capability = (8, 0)
    limit = SHARED_LIMIT[(9, 0)] if capability >= (9, 0) else SHARED_LIMIT[(8, 0)]
    out_channels_last = named_args["soc"] == 1
    fitting = fwd_configs_that_fit(configs, named_args["x_ptr"].element_size(), limit, out_channels_last)
    return fitting or configs[-1:]


def _fwd_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)
            for bm, bn, bk, warps, stages in FWD_CONFIGS]


# Autotuning only where there is a GPU to tune on: the interpreter runs one small fixed config.
_fwd_tuned = triton.autotune(
    _fwd_configs(),
    key=["N", "H", "W", "C_in_g", "C_out_g", "KH", "KW", "stride_h", "stride_w", "son"],
    prune_configs_by={"early_config_prune": _prune},
)(_conv_transpose_fwd_kernel)
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}


def _needs_int64(x, w, out, stride, padding, dilation) -> bool:
    """Whether some offset the kernel forms for an element it really reads or writes can pass 2**31 - 1.

    x's row offsets run over the phase's output grid (up to OH / stride rows, more than H when dilation is large)
    before a tap's offset (up to (padding + dilation * KH) / stride + 1 rows) moves them back into the image, so
    both are bounded here, not only x.numel(). Masked lanes may wrap: they are never dereferenced.
    """
    n, c, h, wd = x.shape
    reach_h = out.shape[2] + (padding[0] + dilation[0] * w.shape[2]) // stride[0] + 1
    reach_w = out.shape[3] + (padding[1] + dilation[1] * w.shape[3]) // stride[1] + 1
    x_reach = n * x.stride(0) + reach_h * x.stride(2) + reach_w * x.stride(3) + c * x.stride(1)
    return max(x_reach, x.numel(), w.numel(), out.numel()) >= 2**31


def conv_transpose2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                     pre: torch.Tensor | None, stride, padding, groups: int, dilation, scale: torch.Tensor | None,
                     shift: torch.Tensor | None, activation: int, negative_slope: float) -> None:
    """Fill ``out`` (and ``pre`` = conv + bias, before scale/shift/activation, when given) for x [N, C_in, H, W],
    weight [C_in, C_out/groups, KH, KW]; out and pre are [N, C_out, OH, OW] in x's dtype, any strides (the
    same for both).

    ``activation`` is a code (genfast.ops.conv_transpose.ACTIVATION_CODES). Arguments are validated and the
    outputs allocated by genfast.ops.conv_transpose2d; this is the launcher.
    """
    N, C_in, H, W = x.shape
    _, C_out_g, KH, KW = weight.shape
    OH, OW = out.shape[2], out.shape[3]
    on_gpu = x.device.type == "cuda"
    # Channels contiguous in x (the A tile's rows) and output channels contiguous in the weight (the B tile's
    # rows): the layouts the pipelined K loop needs. A no-op when x is channels_last already.
    x = x.contiguous(memory_format=torch.channels_last) if x.stride(1) != 1 or x.dim() != 4 else x
    w = weight.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)
    f32 = lambda t: t.to(torch.float32).contiguous() if t is not None else x  # noqa: E731 (x: unused pointer)
    if pre is not None and pre.stride() != out.stride():
        raise ValueError("conv_transpose2d launcher: pre must have out's strides")
    pre_arg = pre if pre is not None else out
    # "ieee" only where it means something (fp32 operands); fp16/bf16 dots keep the tensor-core default.
    ieee = x.dtype == torch.float32 and not (on_gpu and torch.backends.cudnn.allow_tf32)
    steps = [s // math.gcd(s, d) for s, d in zip(stride, dilation)]
    args = (
        x, w, bias.contiguous() if bias is not None else x, f32(scale), f32(shift), out, pre_arg,
        N, H, W, C_in // groups, C_out_g, OH, OW, KH, KW,
        *x.stride(), *w.stride(), *out.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1], steps[0], steps[1],
        float(negative_slope),
    )
    flags = dict(HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
                 SAVE_PRE=pre is not None, ACTIVATION=activation,
                 DOT_FP32=_backend.TRITON_INTERPRET or not on_gpu,  # the interpreter's bf16 dot is wrong
                 INPUT_PRECISION="ieee" if ieee else "tf32",
                 INDEX_64=_needs_int64(x, w, out, stride, padding, dilation))
    m_max = N * triton.cdiv(OH, stride[0]) * triton.cdiv(OW, stride[1])

    def grid(meta):
        return (triton.cdiv(m_max, meta["BLOCK_M"]) * triton.cdiv(C_out_g, meta["BLOCK_N"]),
                stride[0] * stride[1], groups)

    if on_gpu and not _backend.TRITON_INTERPRET:
        _fwd_tuned[grid](*args, **flags)
    else:
        _conv_transpose_fwd_kernel[grid(_INTERPRETER_BLOCKS)](*args, **flags, **_INTERPRETER_BLOCKS)


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
                      shift: torch.Tensor | None, activation: int, negative_slope: float,
                      dpre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of out = act(pre * scale + shift) for grad, pre [N, C, H, W] (any strides).

    Fills ``dpre`` (grad's shape and dtype, any strides) and returns (dscale [C] fp32, dshift [C] fp32).
    ``activation`` is a code as in the forward; ``pre`` may be None only when it is 0 (the identity): then
    dscale is not computed (zeros).
    """
    N, C, H, W = grad.shape
    R = N * H * W
    block_c, block_r = (32, 128) if grad.is_cuda else (16, 64)
    # 8 warps: 16 tile elements per thread. With 4 (32 each, three int64 addresses apiece) the gelu derivative
    # spilled under triton 3.6 (136 B on sm_90a, 304 B on sm_80).
    warps = 8 if grad.is_cuda else 4
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
            ACTIVATION=activation, BLOCK_C=block_c, BLOCK_R=block_r,
            num_warps=warps,
        )
    return dscale_part.sum(0), dshift_part.sum(0)
