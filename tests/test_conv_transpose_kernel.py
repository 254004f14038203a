"""conv_transpose2d/1d: the pipelined Triton kernel's corners, the one activation list, scale/shift dtypes, and the
CPU path without Triton.

Tolerances follow the rule in CONTRIBUTING.md: the fused result may be off the float64 reference by at most twice
what torch itself is off in the input's precision, plus (atol, rtol). Shapes are small because the Triton
interpreter runs these on the CPU; they still cross the kernel's tile and K-chunk edges (odd sizes 1, 17, 97).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import genfast
from genfast.nn.conv_transpose import activation_module, activation_name
from genfast.ops import conv_transpose1d, conv_transpose2d, conv_transpose2d_ref
from genfast.ops.conv_transpose import ACTIVATION_CODES, ACTIVATION_TABLE, ACTIVATIONS, activate
from tests.conftest import backend_params
from tests.test_conv_transpose import inputs, lowp, make, reference64
from tests.tolerance import assert_close_to_ref

OP = "conv_transpose2d"
BACKENDS = backend_params(OP)
ROOT = Path(__file__).resolve().parents[1]
DTYPES = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 1e-2, 1e-2, id="bf16"),
]


def _served(backend, device, dtype):
    why = genfast._backend.DISPATCHERS[OP].why_not(backend, torch.device(device), dtype)
    if why:
        pytest.skip(why)


# ------------------------------------------------------------------------------------------- the K loop
# (id, x shape, weight shape, conv kwargs): the K loop runs over (tap, channel chunk) pairs; the interpreter's
# chunk is 16 channels, so 17 and 40 input channels per group end a tap mid-chunk, and 97 output channels end
# the N tile mid-tile. Each case crosses tap boundaries with several chunks per tap.
K_LOOP_CASES = [
    ("cin17_cout97_k4s2", (1, 17, 3, 2), (17, 97, 4, 4), dict(stride=2, padding=1)),
    ("cin40_groups2_k3s2", (2, 80, 3, 3), (80, 5, 3, 3), dict(stride=2, padding=1, output_padding=1, groups=2)),
    ("cin33_k5s3_dil2", (1, 33, 2, 3), (33, 3, 5, 3), dict(stride=(3, 2), padding=(2, 1), dilation=(2, 3))),
    ("batch1_1x1_latent", (1, 17, 1, 1), (17, 7, 4, 4), dict(stride=1, padding=0)),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("cid,x_shape,w_shape,conv", K_LOOP_CASES, ids=[c[0] for c in K_LOOP_CASES])
def test_k_loop_crosses_taps_and_chunks(device, backend, dtype, atol, rtol, layout, cid, x_shape, w_shape, conv):
    _served(backend, device, dtype)
    x, weight, bias, scale, shift = inputs(x_shape, w_shape, conv, "bn", dtype, device, layout == "channels_last")
    with genfast.backend(backend):
        out = conv_transpose2d(x, weight, bias, **conv, scale=scale, shift=shift, activation="leaky_relu")
    ref = reference64(x, weight, bias, scale, shift, "leaky_relu", **conv)
    assert_close_to_ref(out, ref, lowp(x, weight, bias, scale, shift, "leaky_relu", **conv), atol, rtol)
    # The output keeps the caller's layout, whatever layout the kernel read x in.
    if x.shape[2] * x.shape[3] > 1:  # a 1x1 x is in both layouts at once
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_gradients_across_chunks(device, backend, layout):
    """dx, dweight, dbias, dscale, dshift through the merged K loop's forward (fp32, NCHW and channels_last)."""
    dtype = torch.float32
    _served(backend, device, dtype)
    conv = dict(stride=2, padding=1, groups=2)
    x, weight, bias, scale, shift = inputs((2, 34, 3, 2), (34, 3, 4, 4), conv, "bn", dtype, device,
                                           layout == "channels_last")
    leaves = [t.requires_grad_() for t in (x, weight, bias, scale, shift)]
    with genfast.backend(backend):
        out = conv_transpose2d(x, weight, bias, **conv, scale=scale, shift=shift, activation="tanh")
    grad = make(out.shape, dtype, seed=5, device=device)
    got = torch.autograd.grad(out, leaves, grad)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = conv_transpose2d_ref(*leaves64[:3], **conv, scale=leaves64[3], shift=leaves64[4], activation="tanh")
    want = torch.autograd.grad(ref, leaves64, grad.double())
    low = torch.autograd.grad(lowp(x, weight, bias, scale, shift, "tanh", **conv), leaves, grad)
    for name, g, w, lo in zip(["x", "weight", "bias", "scale", "shift"], got, want, low):
        assert_close_to_ref(g, w, lo, 1e-4, 1e-5, what=f"d{name}")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_conv_transpose1d_odd_length(device, backend):
    """The 1-D op runs the 2-D body with H = 1: odd lengths, channels past one chunk."""
    x = make((1, 17, 97), torch.float32, seed=0, device=device)
    weight = make((17, 5, 4), torch.float32, seed=1, device=device, scale=0.5)
    with genfast.backend(backend):
        out = conv_transpose1d(x, weight, None, stride=2, padding=1, activation="relu")
    ref = torch.relu(torch.nn.functional.conv_transpose1d(x.double(), weight.double(), stride=2, padding=1))
    low = torch.relu(torch.nn.functional.conv_transpose1d(x, weight, stride=2, padding=1))
    assert out.shape == (1, 5, 194)
    assert_close_to_ref(out, ref, low, 1e-5, 1e-5)


# ------------------------------------------------------------------------------------------- scale / shift dtypes
@pytest.mark.parametrize("device,backend", BACKENDS + [pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("vec_dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_scale_and_shift_take_any_float_dtype(device, backend, vec_dtype):
    """Issue 18 #9: a float64 (or 16-bit) scale/shift is accepted, read as float32, and gets a gradient in its
    own dtype."""
    x, weight, bias, scale, shift = inputs((1, 4, 3, 3), (4, 3, 3, 3), dict(stride=2), "bn", torch.float32, device)
    scale_v = scale.to(vec_dtype).requires_grad_()
    shift_v = shift.to(vec_dtype).requires_grad_()
    with genfast.backend(backend):
        out = conv_transpose2d(x, weight, bias, stride=2, scale=scale_v, shift=shift_v, activation="relu")
    want = conv_transpose2d(x, weight, bias, stride=2, scale=scale_v.detach().float(),
                            shift=shift_v.detach().float(), activation="relu")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    dscale, dshift = torch.autograd.grad(out.sum(), [scale_v, shift_v])
    assert dscale.dtype == vec_dtype and dshift.dtype == vec_dtype


@pytest.mark.parametrize("name", ["scale", "shift"])
def test_integer_scale_is_refused(name):
    with pytest.raises(TypeError, match=name):
        conv_transpose2d(torch.randn(1, 4, 3, 3), torch.randn(4, 3, 3, 3), **{name: torch.ones(3, dtype=torch.int64)})


# ------------------------------------------------------------------------------------------- one activation list
def test_activation_list_is_one_list():
    """The op's list, its codes, the nn modules and torch's functions come from one table."""
    assert ACTIVATIONS[0] is None and list(ACTIVATIONS[1:]) == list(ACTIVATION_TABLE)
    assert ACTIVATION_CODES == {name or "none": i for i, name in enumerate(ACTIVATIONS)}
    y = torch.linspace(-4, 4, 41)
    for name, entry in ACTIVATION_TABLE.items():
        module = activation_module(name, 0.2)
        assert isinstance(module, entry.module) and activation_name(module) == (name, 0.2 if
                                                                                 name == "leaky_relu" else 0.01)
        torch.testing.assert_close(activate(y, name, 0.2), module(y))
        torch.testing.assert_close(activate(y.clone(), name, 0.2, inplace=True), module(y))
    assert activation_name(nn.GELU(approximate="tanh")) is None and activation_name(nn.ELU()) is None


def test_cuda_kernel_codes_mirror_the_list():
    """csrc/cuda/conv_transpose.cuh's ConvActivation and the bindings' names follow ACTIVATIONS' order."""
    header = (ROOT / "csrc/cuda/conv_transpose.cuh").read_text()
    enum = re.search(r"enum class ConvActivation : int \{([^}]*)\}", header).group(1)
    codes = {m.group(1): int(m.group(2)) for m in re.finditer(r"k(\w+) = (\d+)", enum)}
    assert codes == {_camel(name): code for name, code in ACTIVATION_CODES.items()}
    bindings = (ROOT / "csrc/cuda/bindings/conv_transpose.cpp").read_text()
    pairs = dict(re.findall(r'if \(name == "(\w+)"\) return ConvActivation::k(\w+);', bindings))
    assert pairs == {name: _camel(name) for name in ACTIVATION_CODES}


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


# ------------------------------------------------------------------------------------------- CPU without Triton
def test_cpu_path_and_shapes_need_no_triton():
    """Issue 17: the output-shape arithmetic lives in the op, so the CPU path and the fake impl run where Triton
    is not installed (simulated by blocking its import in a fresh interpreter)."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, genfast\n"
        "from torch._subclasses.fake_tensor import FakeTensorMode\n"
        "x, w = torch.randn(2, 4, 3, 3), torch.randn(4, 5, 4, 4)\n"
        "for b in ('cpu', 'reference'):\n"
        "    with genfast.backend(b):\n"
        "        assert genfast.ops.conv_transpose2d(x, w, stride=2, padding=1, activation='relu').shape == "
        "(2, 5, 6, 6)\n"
        "with FakeTensorMode():\n"
        "    out = torch.ops.genfast.conv_transpose2d_triton(torch.empty(2, 4, 3, 3), torch.empty(4, 5, 4, 4), None,"
        " [2, 2], [1, 1], [0, 0], 1, [1, 1], None, None, 'none', 0.0, False)[0]\n"
        "assert out.shape == (2, 5, 6, 6)\n"
        "assert sys.modules['triton'] is None\n"
        "print('ok')\n"
    )
    env = {"PATH": "/usr/bin:/bin", "GENFAST_BACKEND": "auto"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


# ------------------------------------------------------------------------------------------- launcher rules
def test_config_rules():
    """Every config fits sm_90's shared memory for 16-bit data; fp32's largest are dropped where they overflow;
    NCHW outputs drop the accumulator tiles whose scattered-store epilogue spills; something always remains."""
    kernels = pytest.importorskip("genfast.kernels.conv_transpose")
    configs = kernels._fwd_configs()
    sm90, sm80 = kernels.SHARED_LIMIT[(9, 0)], kernels.SHARED_LIMIT[(8, 0)]
    assert kernels.fwd_configs_that_fit(configs, 2, sm90, True) == configs
    fp32_sm80 = kernels.fwd_configs_that_fit(configs, 4, sm80, True)
    assert 0 < len(fp32_sm80) < len(configs)
    for c in fp32_sm80:
        k = c.kwargs
        assert kernels.fwd_shared_bytes(k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], c.num_stages, 4) <= sm80
    nchw = kernels.fwd_configs_that_fit(configs, 2, sm90, False)
    assert nchw and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 32 * 32 * c.num_warps for c in nchw)
    assert len(nchw) < len(configs)


def test_int64_offsets_only_where_needed():
    kernels = pytest.importorskip("genfast.kernels.conv_transpose")
    small = torch.empty(2, 8, 4, 4, device="meta")
    w = torch.empty(8, 4, 4, 4, device="meta")
    out = torch.empty(2, 4, 8, 8, device="meta")
    assert not kernels._needs_int64(small, w, out, (2, 2), (1, 1), (1, 1))
    big = torch.empty(2**16, 256, 8, 16, device="meta")  # 2**31 elements
    assert kernels._needs_int64(big, w, out, (2, 2), (1, 1), (1, 1))
    # A 1-row input with a huge dilation: the output grid runs far past the input's rows, so x's row offsets
    # pass 2**31 before the tap brings them back, though x itself is small.
    tall = torch.empty(1, 512, 1, 2**12, device="meta").to(memory_format=torch.channels_last)
    w_dil = torch.empty(512, 1, 3, 1, device="meta")
    out_dil = torch.empty(1, 1, 2 * 2**10 + 1, 2**12, device="meta")
    assert tall.numel() < 2**31 and kernels._needs_int64(tall, w_dil, out_dil, (1, 1), (0, 0), (2**10, 1))


@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_strided_bias_scale_and_shift_are_read_by_their_strides(backend):
    """A bias/scale/shift that is a strided view (every other element) must be read through its strides."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 3, 3, generator=gen)
    w = torch.randn(2, 2, 1, 1, generator=gen)
    bias = torch.tensor([1.0, 10.0, 2.0, 20.0])[::2]
    scale = torch.tensor([0.5, 7.0, 2.0, 9.0])[::2]
    shift = torch.tensor([-1.0, 5.0, 3.0, 6.0])[::2]
    expected = conv_transpose2d_ref(x, w, bias.contiguous(), scale=scale.contiguous(), shift=shift.contiguous())
    with genfast.backend(backend):
        got = genfast.ops.conv_transpose2d(x, w, bias, scale=scale, shift=shift)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
