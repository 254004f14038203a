"""conv_transpose2d / conv_transpose1d: every kernel backend against the reference, gradients, bad input, opcheck,
torch.compile.

Tolerances follow the rule in CONTRIBUTING.md: the fused result may be off the float64 reference by at most
twice what torch itself is off when it computes conv_transpose + epilogue in the input's precision, plus
(atol, rtol). Shapes are tiny because the Triton interpreter runs these on the CPU.
"""

import pytest
import torch
import torch.nn.functional as F

import genfast
from genfast.ops import conv_transpose1d, conv_transpose2d, conv_transpose2d_ref
from genfast.ops.conv_transpose import activate
from tests.conftest import backend_params
from tests.tolerance import assert_close_to_ref

OP = "conv_transpose2d"
BACKENDS = backend_params(OP)
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
]
ACTS = [None, "relu", "leaky_relu", "tanh", "sigmoid", "silu", "gelu"]


@pytest.fixture(autouse=True)
def _skip_unserved(request):
    """A backend that declines a dtype (the CPU path serves float32 only) is not a failure: auto routes around it."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if {"device", "backend", "dtype"} <= params.keys():
        why = genfast._backend.DISPATCHERS[OP].why_not(params["backend"], torch.device(params["device"]),
                                                       params["dtype"])
        if why:
            pytest.skip(why)

# (id, x shape, weight shape, conv kwargs, epilogue): the layers people run plus the corners of the index maths.
CONFIGS = [
    ("dcgan_k4s2p1", (2, 8, 4, 4), (8, 6, 4, 4), dict(stride=2, padding=1), ("bn", "relu")),
    ("latent_k4s1p0_1x1", (2, 10, 1, 1), (10, 8, 4, 4), dict(stride=1, padding=0), ("bn", "relu")),
    ("cyclegan_k3s2p1op1", (1, 6, 5, 5), (6, 4, 3, 3), dict(stride=2, padding=1, output_padding=1),
     ("bn", "relu")),
    ("odd_s3x2", (1, 3, 7, 5), (3, 5, 5, 3), dict(stride=(3, 2), padding=(2, 1), output_padding=(1, 0)),
     ("bias", "tanh")),
    ("groups3", (2, 6, 3, 4), (6, 2, 3, 3), dict(stride=2, padding=1, groups=3), ("bn", "leaky_relu")),
    ("depthwise", (1, 4, 3, 3), (4, 1, 3, 3), dict(stride=2, groups=4), ("bias", None)),
    ("dilation", (1, 4, 4, 3), (4, 3, 3, 2), dict(stride=2, padding=(1, 0), output_padding=(2, 1), dilation=(3, 2)),
     ("bn", "silu")),
    ("stride_gt_kernel", (1, 3, 3, 2), (3, 2, 2, 2), dict(stride=3, padding=0, output_padding=2), ("bn", "gelu")),
    ("no_bias_s1", (1, 17, 3, 5), (17, 3, 2, 3), dict(stride=1, padding=(1, 0)), ("none", "sigmoid")),
]


def make(shape, dtype, *, seed, scale=1.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)


def inputs(x_shape, w_shape, kwargs, epilogue, dtype, device, channels_last=False):
    """x, weight, bias, scale, shift for a config; the epilogue is "bn" (bias, scale, shift), "bias" or "none"."""
    c_out = w_shape[1] * kwargs.get("groups", 1)
    x = make(x_shape, dtype, seed=0, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = make(w_shape, dtype, seed=1, device=device, scale=0.5)
    bias = make((c_out,), dtype, seed=2, device=device) if epilogue != "none" else None
    scale = shift = None
    if epilogue == "bn":
        scale = (0.5 + torch.rand(c_out, generator=torch.Generator().manual_seed(3))).to(device)
        shift = make((c_out,), torch.float32, seed=4, device=device)
    return x, weight, bias, scale, shift


def lowp(x, weight, bias, scale, shift, activation, negative_slope=0.01, **conv):
    """What torch computes in the inputs' own precision: its conv, then the epilogue in that dtype."""
    y = F.conv_transpose2d(x, weight, bias, **conv)
    if scale is not None:
        y = y * scale.to(y.dtype).view(1, -1, 1, 1)
    if shift is not None:
        y = y + shift.to(y.dtype).view(1, -1, 1, 1)
    return activate(y, activation, negative_slope)


def reference64(x, weight, bias, scale, shift, activation, negative_slope=0.01, **conv):
    d = lambda t: t.detach().double() if t is not None else None  # noqa: E731
    return conv_transpose2d_ref(d(x), d(weight), d(bias), scale=d(scale), shift=d(shift), activation=activation,
                                negative_slope=negative_slope, **conv)


# ------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("cid,x_shape,w_shape,conv,epilogue", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_forward_matches_reference(device, backend, dtype, atol, rtol, channels_last, cid, x_shape, w_shape, conv,
                                   epilogue):
    x, weight, bias, scale, shift = inputs(x_shape, w_shape, conv, epilogue[0], dtype, device, channels_last)
    activation = epilogue[1]
    with genfast.backend(backend):
        out = conv_transpose2d(x, weight, bias, **conv, scale=scale, shift=shift, activation=activation)
    ref = reference64(x, weight, bias, scale, shift, activation, **conv)
    assert out.dtype == dtype
    if channels_last and x.shape[2] * x.shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_ref(out, ref, lowp(x, weight, bias, scale, shift, activation, **conv), atol, rtol)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("activation", ACTS)
def test_each_activation(device, backend, dtype, atol, rtol, activation):
    """Forward and backward of every activation (its derivative is fused in the epilogue backward kernel)."""
    _, x_shape, w_shape, conv, _ = CONFIGS[2]
    x, weight, bias, scale, shift = inputs(x_shape, w_shape, conv, "bn", dtype, device)
    # Spread pre-activations over the saturating ranges of tanh/sigmoid and both sides of the kinks.
    shift = shift * 3
    leaves = [t.requires_grad_() for t in (x, weight, bias, scale, shift)]
    with genfast.backend(backend):
        out = conv_transpose2d(x, weight, bias, **conv, scale=scale, shift=shift, activation=activation,
                               negative_slope=0.2)
    ref = reference64(x, weight, bias, scale, shift, activation, 0.2, **conv)
    low = lowp(x, weight, bias, scale, shift, activation, 0.2, **conv)
    assert_close_to_ref(out, ref, low, atol, rtol)

    grad = make(out.shape, dtype, seed=5, device=device)
    got = torch.autograd.grad(out, leaves, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = conv_transpose2d_ref(*leaves64[:3], **conv, scale=leaves64[3], shift=leaves64[4], activation=activation,
                               negative_slope=0.2)
    want = torch.autograd.grad(ref, leaves64, grad.double())
    for name, g, w, lo in zip(["x", "weight", "bias", "scale", "shift"], got, want,
                              torch.autograd.grad(low, leaves, grad)):
        assert_close_to_ref(g, w, lo, atol * 10, rtol, what=f"d{name}")


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_conv_transpose1d(device, backend, dtype, atol, rtol):
    x = make((2, 6, 9), dtype, seed=0, device=device)
    weight = make((6, 2, 5), dtype, seed=1, device=device, scale=0.5)
    bias = make((4,), dtype, seed=2, device=device)
    conv = dict(stride=3, padding=2, output_padding=1, groups=2, dilation=2)
    with genfast.backend(backend):
        out = conv_transpose1d(x, weight, bias, **conv, activation="silu")
    ref = F.silu(F.conv_transpose1d(x.double(), weight.double(), bias.double(), **conv))
    low = F.silu(F.conv_transpose1d(x, weight, bias, **conv))
    assert out.shape == ref.shape
    assert_close_to_ref(out, ref, low, atol, rtol)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_unbatched_and_empty_batch(device, backend):
    x = make((3, 4, 5), torch.float32, seed=0, device=device)
    weight = make((3, 2, 3, 3), torch.float32, seed=1, device=device)
    with genfast.backend(backend):
        out = conv_transpose2d(x, weight, stride=2, activation="relu")
        empty = conv_transpose2d(x[None][:0], weight, stride=2)
    torch.testing.assert_close(out, F.relu(F.conv_transpose2d(x, weight, stride=2)), atol=1e-5, rtol=1e-5)
    assert empty.shape == (0, 2, 9, 11)


@pytest.mark.parametrize("groups", [1, 2])
def test_cpu_auto_folds_the_epilogue(groups):
    """auto on CPU: float32 runs the CPU path (scale folded into the weight, shift into the bias: one conv), which
    agrees with the reference to rounding; the low precisions run the reference itself."""
    x, weight, bias, scale, shift = inputs((2, 8, 4, 4), (8, 6, 4, 4), {"groups": groups}, "bn", torch.float32, "cpu")
    assert genfast._backend.DISPATCHERS[OP].select(torch.device("cpu"), torch.float32)[0] == (
        "cpu" if genfast._ext.loaded else "reference")
    out = conv_transpose2d(x, weight, bias, 2, 1, groups=groups, scale=scale, shift=shift, activation="relu")
    ref = conv_transpose2d_ref(x, weight, bias, 2, 1, groups=groups, scale=scale, shift=shift, activation="relu")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    xb, wb, bb = (t.bfloat16() for t in (x, weight, bias))
    out = conv_transpose2d(xb, wb, bb, 2, 1, groups=groups, scale=scale, shift=shift, activation="relu")
    assert torch.equal(out, conv_transpose2d_ref(xb, wb, bb, 2, 1, groups=groups, scale=scale, shift=shift,
                                                 activation="relu"))


# ------------------------------------------------------------------------------------------- gradients
GRAD_CASES = [(CONFIGS[0], "relu"), (CONFIGS[2], "gelu"), (CONFIGS[4], "tanh"), (CONFIGS[6], None),
              (CONFIGS[8], "sigmoid")]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("config,activation", GRAD_CASES, ids=[f"{c[0]}-{a}" for c, a in GRAD_CASES])
def test_gradients(device, backend, dtype, atol, rtol, config, activation):
    _, x_shape, w_shape, conv, epilogue = config
    x, weight, bias, scale, shift = inputs(x_shape, w_shape, conv, epilogue[0], dtype, device,
                                           channels_last=config[0] == "groups3")
    leaves = [t.requires_grad_() for t in (x, weight, bias, scale, shift) if t is not None]
    with genfast.backend(backend):
        out = conv_transpose2d(x, weight, bias, **conv, scale=scale, shift=shift, activation=activation)
    grad = make(out.shape, dtype, seed=5, device=device)
    got = torch.autograd.grad(out, leaves, grad)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(leaves64)
    args64 = [next(it) if t is not None else None for t in (x, weight, bias, scale, shift)]
    ref = conv_transpose2d_ref(*args64[:3], **conv, scale=args64[3], shift=args64[4], activation=activation)
    want = torch.autograd.grad(ref, leaves64, grad.double())
    low = torch.autograd.grad(lowp(x, weight, bias, scale, shift, activation, **conv), leaves, grad)
    # Reductions over N*H*W (dbias, dscale, dshift) and the convolution gradients sum many terms: the budget
    # scales with torch's own low-precision error on the same sums, plus a floor for fp32.
    for name, g, w, lo in zip(["x", "weight", "bias", "scale", "shift"], got, want, low):
        assert g.dtype == lo.dtype
        assert_close_to_ref(g, w, lo, atol * 10, rtol, what=f"d{name}")


# The forward custom op each kernel backend runs (looked up lazily: the C++ op exists only with the extension).
FORWARD_OPS = {"triton": lambda: torch.ops.genfast.conv_transpose2d_triton,
               "cuda": lambda: torch.ops.genfast.conv_transpose2d}


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_backward_without_saved_pre(device, backend):
    """The op called with save_pre=False (as opcheck and direct callers may) recomputes pre in the backward."""
    if backend not in FORWARD_OPS:
        pytest.skip(f"the {backend} path is composed of torch ops (autograd is torch's), not a custom op")
    x, weight, bias, scale, shift = inputs((1, 6, 5, 5), (6, 4, 3, 3), {}, "bn", torch.float32, device)
    leaves = [t.requires_grad_() for t in (x, weight, bias, scale, shift)]
    conv = ([2, 2], [1, 1], [1, 1], 1, [1, 1])
    out, pre = FORWARD_OPS[backend]()(x, weight, bias, *conv[:3], conv[3], conv[4], scale, shift, "gelu", 0.01, False)
    assert pre.numel() == 0
    grad = make(out.shape, torch.float32, seed=5, device=device)
    got = torch.autograd.grad(out, leaves, grad)
    ref = conv_transpose2d_ref(x, weight, bias, 2, 1, 1, scale=scale, shift=shift, activation="gelu")
    want = torch.autograd.grad(ref, leaves, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------- bad input
def _good():
    return dict(x=torch.randn(2, 4, 3, 3), weight=torch.randn(4, 3, 3, 3), bias=torch.randn(3))


BAD = [
    ("weight", dict(weight=torch.randn(5, 3, 3, 3)), ValueError, "weight"),
    ("weight_ndim", dict(weight=torch.randn(4, 3, 3)), ValueError, "weight"),
    ("groups", dict(groups=3, weight=torch.randn(4, 1, 3, 3)), ValueError, "divisible by groups"),
    ("groups_zero", dict(groups=0), ValueError, "groups"),
    ("output_padding", dict(stride=2, output_padding=2), ValueError, "output_padding"),
    ("output_padding_s1", dict(output_padding=1), ValueError, "output_padding"),
    ("padding", dict(padding=-1), ValueError, "padding"),
    ("stride", dict(stride=0), ValueError, "stride"),
    ("stride_type", dict(stride=1.5), TypeError, "stride"),
    ("stride_len", dict(stride=(1, 2, 3)), TypeError, "stride"),
    ("dilation", dict(dilation=0), ValueError, "dilation"),
    ("empty_out", dict(padding=5), ValueError, "padding"),
    ("bias_shape", dict(bias=torch.randn(4)), ValueError, "bias"),
    ("bias_dtype", dict(bias=torch.randn(3, dtype=torch.float64)), TypeError, "bias"),
    ("scale_shape", dict(scale=torch.randn(2)), ValueError, "scale"),
    ("shift_type", dict(shift=[1.0, 2.0, 3.0]), TypeError, "shift"),
    ("x_dtype", dict(x=torch.randn(2, 4, 3, 3, dtype=torch.float64), weight=torch.randn(4, 3, 3, 3).double(),
                     bias=None), TypeError, "x"),
    ("x_int", dict(x=torch.ones(2, 4, 3, 3, dtype=torch.int64)), TypeError, "x"),
    ("x_ndim", dict(x=torch.randn(2, 2, 4, 3, 3)), ValueError, "x"),
    ("x_not_tensor", dict(x=[1.0]), TypeError, "x"),
    ("mixed_dtype", dict(weight=torch.randn(4, 3, 3, 3).half()), TypeError, "weight"),
    ("activation", dict(activation="swish"), ValueError, "activation"),
    ("negative_slope", dict(activation="leaky_relu", negative_slope="0.1"), TypeError, "negative_slope"),
]


@pytest.mark.parametrize("bad,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(bad, exc, match):
    args = {**_good(), **bad}
    with pytest.raises(exc, match=match):
        conv_transpose2d(**args)


def test_mixed_devices():
    meta = torch.randn(4, 3, 3, 3, device="meta")
    with pytest.raises(ValueError, match="weight is on meta"):
        conv_transpose2d(torch.randn(2, 4, 3, 3), meta)
    with pytest.raises(ValueError, match="scale is on meta"):
        conv_transpose2d(torch.randn(2, 4, 3, 3), torch.randn(4, 3, 3, 3), scale=torch.ones(3, device="meta"))


def test_bad_input_1d():
    with pytest.raises(ValueError, match="weight"):
        conv_transpose1d(torch.randn(2, 4, 5), torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="output_padding"):
        conv_transpose1d(torch.randn(2, 4, 5), torch.randn(4, 3, 3), stride=2, output_padding=3)


# ------------------------------------------------------------------------------------------- opcheck, compile
def _op_args(device, dtype, save_pre, requires_grad):
    x, weight, bias, scale, shift = inputs((1, 4, 3, 3), (4, 6, 4, 4), {"groups": 2}, "bn", dtype, device)
    if requires_grad:
        for t in (x, weight, bias, scale, shift):
            t.requires_grad_()
    return (x, weight, bias, [2, 2], [1, 1], [0, 0], 2, [1, 1], scale, shift, "leaky_relu", 0.1, save_pre)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("save_pre", [False, True])
def test_opcheck(device, backend, save_pre):
    if backend not in FORWARD_OPS:
        pytest.skip(f"the {backend} path is composed of torch ops, not a custom op")
    op = FORWARD_OPS[backend]()
    torch.library.opcheck(op, _op_args(device, torch.float32, save_pre, requires_grad=True))
    torch.library.opcheck(op, _op_args(device, torch.bfloat16, save_pre, requires_grad=False))
    grad = make((1, 6, 6, 6), torch.float32, seed=9, device=device).to(memory_format=torch.channels_last)
    pre = make((1, 6, 6, 6), torch.float32, seed=8, device=device)
    bwd = torch.ops.genfast.conv_transpose2d_epilogue_backward_triton
    scale, shift = torch.rand(6, device=device) + 0.5, torch.randn(6, device=device)
    torch.library.opcheck(bwd, (grad, pre, scale, shift, "silu", 0.01))
    torch.library.opcheck(bwd, (grad, None, None, None, "none", 0.01))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph(device, backend):
    x, weight, bias, scale, shift = inputs((2, 8, 4, 4), (8, 6, 4, 4), {}, "bn", torch.float32, device)
    leaves = [t.requires_grad_() for t in (x, weight, bias, scale, shift)]

    def block(x, weight, bias, scale, shift):
        y = conv_transpose2d(x, weight, bias, 2, 1, scale=scale, shift=shift, activation="relu")
        return conv_transpose2d(y, weight[:6, :4].contiguous(), None, 2, 1, activation="tanh")

    with genfast.backend(backend):
        eager = block(*leaves)
        eager_grads = torch.autograd.grad(eager.sum(), leaves)
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True)(*leaves)
        compiled_grads = torch.autograd.grad(compiled.sum(), leaves)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------- autocast
def test_autocast_casts_like_torch():
    """Under torch.autocast the op runs in the autocast dtype, as torch's conv_transpose2d does (fp32 weights with a
    bf16 activation from an autocast layer must not raise), and agrees with torch's result there."""
    x, weight, bias, scale, shift = inputs((2, 8, 4, 4), (8, 6, 4, 4), {}, "bn", torch.float32, "cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_transpose2d(x.bfloat16(), weight, bias, 2, 1, scale=scale, shift=shift, activation="relu")
        want = F.conv_transpose2d(x, weight, bias, 2, 1)
    assert out.dtype == want.dtype == torch.bfloat16
    low = F.relu(want.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    ref = reference64(x, weight, bias, scale, shift, "relu", stride=2, padding=1)
    assert_close_to_ref(out, ref, low, 1e-2, 1e-2)
    out1d = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out1d = conv_transpose1d(x[:, :, 0], weight[:, :, 0], bias, 2, 1)
    assert out1d.dtype == torch.bfloat16
