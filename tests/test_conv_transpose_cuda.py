"""The CUDA C++ conv_transpose2d (genfast::conv_transpose2d) as far as it can be checked without a GPU: its schema
against the Triton twin's, its fake impl on fake CUDA tensors, opcheck and autograd on meta tensors, and the
dispatcher's refusals. Its numerics run in tests/test_conv_transpose.py, whose backend parametrization includes
"cuda" wherever the extension has CUDA kernels (every test there then runs on the C++ kernel too).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import genfast
from genfast import _backend, _ext
from genfast.ops import conv_transpose as ct
from genfast.ops import conv_transpose2d

needs_schema = pytest.mark.skipif(not ct.CUDA_OP_LOADED, reason="the extension with genfast::conv_transpose2d is "
                                  f"not loaded ({_ext.why_not or 'built before the op existed'})")


def _args(x, weight, bias=None, stride=(2, 2), padding=(1, 1), output_padding=(0, 0), groups=1, dilation=(1, 1),
          scale=None, shift=None, activation="relu", negative_slope=0.01, save_pre=True):
    return (x, weight, bias, list(stride), list(padding), list(output_padding), groups, list(dilation), scale, shift,
            activation, negative_slope, save_pre)


@needs_schema
def test_schema_is_the_triton_twins():
    cuda = torch.ops.genfast.conv_transpose2d.default._schema
    triton = torch.ops.genfast.conv_transpose2d_triton.default._schema
    assert [a.name for a in cuda.arguments] == [a.name for a in triton.arguments]
    # Triton's inferred schema says SymInt where the C++ one says int: the same Python values.
    types = lambda schema: [str(a.type).replace("SymInt", "int") for a in schema.arguments]  # noqa: E731
    assert types(cuda) == types(triton)
    assert [str(r.type) for r in cuda.returns] == [str(r.type) for r in triton.returns] == ["Tensor", "Tensor"]


FAKE_CASES = [
    # (x shape, weight shape, stride, padding, output_padding, groups, dilation, channels_last)
    ((2, 8, 4, 4), (8, 6, 4, 4), (2, 2), (1, 1), (0, 0), 1, (1, 1), False),  # DCGAN k4 s2 p1
    ((3, 10, 1, 1), (10, 8, 4, 4), (1, 1), (0, 0), (0, 0), 1, (1, 1), False),  # 1x1 latent, k4 s1 p0
    ((1, 6, 5, 5), (6, 4, 3, 3), (2, 2), (1, 1), (1, 1), 1, (1, 1), True),  # CycleGAN k3 s2 p1 op1
    ((1, 6, 3, 4), (6, 2, 3, 3), (3, 2), (1, 0), (2, 1), 3, (2, 3), True),  # groups, dilation, odd strides
]


@needs_schema
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", FAKE_CASES, ids=["dcgan", "latent", "cyclegan_cl", "groups_dilation_cl"])
@pytest.mark.parametrize("save_pre", [False, True], ids=["no_pre", "pre"])
def test_fake_impl_on_fake_cuda_tensors(dtype, case, save_pre):
    x_shape, w_shape, stride, padding, output_padding, groups, dilation, channels_last = case
    want = torch.nn.functional.conv_transpose2d(torch.zeros(x_shape), torch.zeros(w_shape), None, stride, padding,
                                                output_padding, groups, dilation).shape
    with FakeTensorMode():
        x = torch.empty(x_shape, device="cuda", dtype=dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        weight = torch.empty(w_shape, device="cuda", dtype=dtype)
        c_out = w_shape[1] * groups
        bias = torch.empty(c_out, device="cuda", dtype=dtype)
        scale = torch.empty(c_out, device="cuda")
        out, pre = torch.ops.genfast.conv_transpose2d(*_args(x, weight, bias, stride, padding, output_padding, groups,
                                                             dilation, scale, None, "gelu", 0.01, save_pre))
    assert out.device.type == "cuda" and out.dtype == dtype and out.shape == want
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if save_pre:
        assert pre.shape == want and pre.dtype == dtype and pre.stride() == out.stride()
    else:
        assert pre.numel() == 0


@needs_schema
@pytest.mark.parametrize("save_pre", [False, True])
def test_opcheck_on_meta(save_pre):
    """Schema, fake impl and autograd registration of the C++ op (the kernel itself needs a GPU)."""
    op = torch.ops.genfast.conv_transpose2d
    x = torch.randn(1, 4, 3, 3, device="meta", requires_grad=True)
    weight = torch.randn(4, 6, 4, 4, device="meta", requires_grad=True)
    vec = [torch.randn(12, device="meta", requires_grad=True) for _ in range(3)]
    torch.library.opcheck(op, _args(x, weight, vec[0], groups=2, scale=vec[1], shift=vec[2], activation="leaky_relu",
                                    negative_slope=0.1, save_pre=save_pre))
    torch.library.opcheck(op, _args(x.detach().to(memory_format=torch.channels_last), weight.detach()[:, :3], None,
                                    stride=(3, 1), dilation=(2, 1), output_padding=(1, 0), save_pre=save_pre))


@needs_schema
def test_autograd_shapes_on_meta():
    """The backward wired to the C++ forward gives every input its gradient, shaped like the input."""
    x = torch.randn(2, 4, 5, 5, device="meta", requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, device="meta", requires_grad=True)
    bias, scale, shift = (torch.randn(6, device="meta", requires_grad=True) for _ in range(3))
    out, _ = torch.ops.genfast.conv_transpose2d(*_args(x, weight, bias, output_padding=(1, 1), groups=2, scale=scale,
                                                       shift=shift, activation="tanh"))
    assert out.shape == (2, 6, 10, 10)
    grads = torch.autograd.grad(out, (x, weight, bias, scale, shift), torch.ones_like(out))
    for g, t in zip(grads, (x, weight, bias, scale, shift)):
        assert g.shape == t.shape and g.dtype == t.dtype


def test_cuda_backend_refuses_cpu_tensors():
    x, weight = torch.randn(1, 4, 3, 3), torch.randn(4, 3, 4, 4)
    with genfast.backend("cuda"), pytest.raises(_backend.BackendError, match="conv_transpose2d: backend 'cuda'"):
        conv_transpose2d(x, weight, stride=2, padding=1)


def test_cuda_backend_is_registered_behind_triton():
    dispatch = _backend.DISPATCHERS["conv_transpose2d"]
    assert "cuda" in dispatch.impls
    assert dispatch.preference["cuda"] == ("triton", "cuda")
    reason = dispatch.why_not("cuda", torch.device("cpu"))
    assert reason == "the cuda backend serves cuda tensors, not cpu tensors"


def test_cuda_supports_reasons():
    if ct.CUDA_OP_LOADED:
        assert ct._cuda_supports(torch.device("cuda"), torch.bfloat16, groups=4, phases=4) is None
        assert "float32/float16/bfloat16" in ct._cuda_supports(torch.device("cuda"), torch.float64)
        assert "65535" in ct._cuda_supports(torch.device("cuda"), torch.float32, groups=70000)
        assert "65535" in ct._cuda_supports(torch.device("cuda"), torch.float32, phases=300 * 300)
    else:
        assert "rebuild" in ct._cuda_supports(torch.device("cuda"), torch.float32)
