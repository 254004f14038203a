"""genfast.ops.lstm_cell: every kernel backend against the reference, forward and backward.

Tolerances follow CONTRIBUTING.md, section 3: a fused result may be off the fp32 (fp64) reference by at most twice
what torch itself is off when it computes the same formula in the gates' precision, plus (atol, rtol). The cell
state a kernel returns in fp32 beside half-precision gates is also held to fp32 accuracy (it is computed in fp32).
"""

import os
import subprocess
import sys

import pytest
import torch

import genfast
from genfast.ops import lstm_cell, lstm_cell_ref
from genfast.ops.lstm import lstm_cell_backward_ref
from tests.conftest import backend_params
from tests.tolerance import assert_close_to_ref

# (gates dtype, cell dtype, atol, rtol)
DTYPES = [
    pytest.param(torch.float32, torch.float32, 1e-6, 1e-6, id="fp32"),
    pytest.param(torch.bfloat16, torch.float32, 8e-3, 8e-3, id="bf16-c32"),
    pytest.param(torch.bfloat16, torch.bfloat16, 8e-3, 8e-3, id="bf16"),
    pytest.param(torch.float16, torch.float32, 1e-3, 1e-3, id="fp16-c32"),
]
SHAPES = [(1, 1), (17, 17), (3, 97), (2, 1000)]


def make(shape, dtype, *, scale=2.0, seed=0, device="cpu", requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype).requires_grad_(requires_grad)


def inputs(batch, hidden, dtype, c_dtype, device="cpu", requires_grad=False):
    return (make((batch, 4 * hidden), dtype, seed=1, device=device, requires_grad=requires_grad),
            make((batch, 4 * hidden), dtype, seed=2, device=device, requires_grad=requires_grad),
            make((batch, hidden), c_dtype, seed=3, device=device, requires_grad=requires_grad))


def lowp(x_gates, h_gates, c):
    """torch computing the cell in the gates' precision (what nn.LSTMCell does in that dtype)."""
    i, f, g, o = (x_gates + h_gates).chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c.to(x_gates.dtype) + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def ref64(*tensors):
    return lstm_cell_ref(*(t.detach().double() for t in tensors))


# ------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("device,backend", backend_params("lstm_cell"))
@pytest.mark.parametrize("dtype,c_dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward(device, backend, dtype, c_dtype, atol, rtol, shape):
    xg, hg, c = inputs(*shape, dtype, c_dtype, device)
    with genfast.backend(backend):
        h, c_new = lstm_cell(xg, hg, c)
    assert h.dtype == dtype and c_new.dtype == c_dtype and h.shape == c.shape == c_new.shape
    want_h, want_c = ref64(xg, hg, c)
    low_h, low_c = lowp(xg, hg, c)
    assert_close_to_ref(h, want_h, low_h, atol, rtol, what="h")
    assert_close_to_ref(c_new, want_c, low_c, atol, rtol, what="c")
    if c_dtype == torch.float32:  # the state is computed and kept in fp32
        torch.testing.assert_close(c_new.double(), want_c, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("device,backend", backend_params("lstm_cell"))
def test_forward_non_contiguous_and_saturated(device, backend):
    # Gates from a transposed product and a column slice; pre-activations up to +-200 (exp overflows in fp32).
    hidden = 33
    xg = make((4 * hidden, 5), torch.float32, scale=60.0, seed=4, device=device).t()
    hg = make((5, 8 * hidden), torch.float32, seed=5, device=device)[:, ::2]
    c = make((5, 2 * hidden), torch.float32, seed=6, device=device)[:, hidden:]
    assert not (xg.is_contiguous() or hg.is_contiguous() or c.is_contiguous())
    with genfast.backend(backend):
        h, c_new = lstm_cell(xg, hg, c)
    want_h, want_c = ref64(xg, hg, c)
    assert torch.isfinite(h).all() and torch.isfinite(c_new).all()
    torch.testing.assert_close(h.double(), want_h, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(c_new.double(), want_c, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("device,backend", backend_params("lstm_cell"))
def test_matches_nn_lstm_cell(device, backend):
    # The gate order is nn.LSTMCell's: its weights produce its own (h, c) through the op.
    torch.manual_seed(0)
    cell = torch.nn.LSTMCell(7, 19).to(device)
    x, h0, c0 = torch.randn(3, 7, device=device), torch.randn(3, 19, device=device), torch.randn(3, 19, device=device)
    with torch.no_grad(), genfast.backend(backend):
        want = cell(x, (h0, c0))
        got = lstm_cell(x @ cell.weight_ih.t() + cell.bias_ih, h0 @ cell.weight_hh.t() + cell.bias_hh, c0)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------- backward
@pytest.mark.parametrize("device,backend", backend_params("lstm_cell"))
@pytest.mark.parametrize("dtype,c_dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (17, 17), (3, 97)], ids=str)
def test_backward(device, backend, dtype, c_dtype, atol, rtol, shape):
    xg, hg, c = inputs(*shape, dtype, c_dtype, device, requires_grad=True)
    grad_h = make(c.shape, dtype, seed=7, device=device)
    grad_c = make(c.shape, c_dtype, seed=8, device=device)
    with genfast.backend(backend):
        h, c_new = lstm_cell(xg, hg, c)
    got = torch.autograd.grad((h, c_new), (xg, hg, c), (grad_h, grad_c))
    leaves = [t.detach().double().requires_grad_() for t in (xg, hg, c)]
    want = torch.autograd.grad(lstm_cell_ref(*leaves), leaves, (grad_h.double(), grad_c.double()))
    low = torch.autograd.grad(lowp(xg, hg, c), (xg, hg, c), (grad_h, grad_c.to(dtype)))
    for name, g, w, lp, t in zip(("x_gates", "h_gates", "c"), got, want, low, (xg, hg, c)):
        assert g.dtype == t.dtype, name
        assert_close_to_ref(g, w, lp, atol, rtol, what=name)


@pytest.mark.parametrize("device,backend", backend_params("lstm_cell"))
def test_backward_through_h_only(device, backend):
    # c_new unused: autograd hands the backward no gradient for it; h.sum() hands it a stride-0 gradient.
    xg, hg, c = inputs(4, 9, torch.float32, torch.float32, device, requires_grad=True)
    with genfast.backend(backend):
        lstm_cell(xg, hg, c)[0].sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (xg, hg, c)]
    lstm_cell_ref(*leaves)[0].sum().backward()
    for got, want in zip((xg, hg, c), leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-6, rtol=1e-5)


def test_backward_reference_formula():
    # The backward's written formula (what the kernels implement) against autograd of the forward reference.
    xg, hg, c = inputs(3, 11, torch.float64, torch.float64, requires_grad=True)
    gh, gc = make(c.shape, torch.float64, seed=9), make(c.shape, torch.float64, seed=10)
    want = torch.autograd.grad(lstm_cell_ref(xg, hg, c), (xg, hg, c), (gh, gc))
    d_gates, d_c = lstm_cell_backward_ref(gh, gc, xg, hg, c)
    torch.testing.assert_close(d_gates, want[0])
    torch.testing.assert_close(d_gates, want[1])
    torch.testing.assert_close(d_c, want[2])


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_gradcheck_fp64(backend):
    if backend == "cpu" and "cpu" not in [p.values[1] for p in backend_params("lstm_cell")]:
        pytest.skip("the C++ extension is not built")
    xg, hg, c = inputs(3, 5, torch.float64, torch.float64, requires_grad=True)
    with genfast.backend(backend):
        assert torch.autograd.gradcheck(lstm_cell, (xg * 0.5, hg * 0.5, c))


# Run in a subprocess with ATEN_CPU_CAPABILITY=default (the path to save to in GENFAST_TEST_OUT), and here.
_PATH_SCRIPT = """
import os, torch, genfast
from genfast.ops import lstm_cell
g = torch.Generator().manual_seed(0)
xg, hg = 3 * torch.randn(5, 4 * 37, generator=g), torch.randn(5, 4 * 37, generator=g)
c = torch.randn(5, 37, generator=g)
leaves = [t.requires_grad_() for t in (xg, hg, c)]
with genfast.backend("cpu"):
    h, cn = lstm_cell(*leaves)
grads = torch.autograd.grad((h, cn), leaves, (torch.ones_like(h), torch.ones_like(cn)))
out = [h.detach(), cn.detach(), *grads]
if os.environ.get("GENFAST_TEST_OUT"):
    torch.save(out, os.environ["GENFAST_TEST_OUT"])
"""


def test_scalar_path_matches_vector_path(tmp_path):
    # ATEN_CPU_CAPABILITY=default makes the C++ kernel take its scalar loop; this process runs AVX2 + SLEEF (where
    # the CPU has them).
    if "cpu" not in [p.values[1] for p in backend_params("lstm_cell")]:
        pytest.skip("the C++ extension is not built")
    path = tmp_path / "scalar.pt"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "GENFAST_TEST_OUT": str(path)}
    subprocess.run([sys.executable, "-c", _PATH_SCRIPT], check=True, env=env, timeout=120)
    scalar = torch.load(path, weights_only=True)
    here: dict = {}
    exec(_PATH_SCRIPT.replace("GENFAST_TEST_OUT", "GENFAST_TEST_OUT_UNUSED"), here)
    for s, v in zip(scalar, here["out"]):
        torch.testing.assert_close(s, v, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------- opcheck, compile
def _op(name, backend):
    return getattr(torch.ops.genfast, name + ("_triton" if backend == "triton" else ""))


@pytest.mark.parametrize("device,backend", backend_params("lstm_cell"))
@pytest.mark.parametrize("dtype,c_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16-c32"])
def test_opcheck(device, backend, dtype, c_dtype):
    xg, hg, c = inputs(3, 5, dtype, c_dtype, device, requires_grad=True)
    torch.library.opcheck(_op("lstm_cell", backend), (xg, hg, c))
    grads = (make(c.shape, dtype, seed=7, device=device), make(c.shape, c_dtype, seed=8, device=device))
    torch.library.opcheck(_op("lstm_cell_backward", backend), (*grads, xg.detach(), hg.detach(), c.detach()))


@pytest.mark.parametrize("device,backend", backend_params("lstm_cell"))
def test_compile_fullgraph(device, backend):
    torch.manual_seed(0)
    w_ih, w_hh = torch.randn(24, 4, device=device), torch.randn(24, 6, device=device)
    x = torch.randn(3, 2, 4, device=device)
    h0 = torch.zeros(3, 6, device=device, requires_grad=True)

    def unroll(x, h):  # two steps of a recurrence, the loss of the last state
        c = torch.zeros_like(h)
        for t in range(x.shape[1]):
            h, c = lstm_cell(x[:, t] @ w_ih.t(), h @ w_hh.t(), c)
        return (h * h).sum() + c.sum()

    with genfast.backend(backend):
        eager = unroll(x, h0)
        eager_grad = torch.autograd.grad(eager, h0)
        compiled = torch.compile(unroll, fullgraph=True)(x, h0)
        compiled_grad = torch.autograd.grad(compiled, h0)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


# ------------------------------------------------------------------------------------------- arguments
def test_backend_by_name_that_cannot_serve():
    xg, hg, c = inputs(2, 3, torch.float64, torch.float64)
    with genfast.backend("triton"), pytest.raises(genfast.BackendError, match="fp64"):
        lstm_cell(xg, hg, c)
    with genfast.backend("reference"):
        assert lstm_cell(xg, hg, c)[0].dtype == torch.float64


_G = torch.zeros(2, 12)
_C = torch.zeros(2, 3)


@pytest.mark.parametrize("args,error,match", [
    (([1.0], _G, _C), TypeError, "lstm_cell: x_gates must be a torch.Tensor"),
    ((_G, None, _C), TypeError, "lstm_cell: h_gates must be a torch.Tensor"),
    ((_G, _G, "c"), TypeError, "lstm_cell: c must be a torch.Tensor"),
    ((_G.long(), _G, _C), TypeError, "x_gates must have dtype"),
    ((_G, _G.half(), _C), TypeError, "h_gates has dtype torch.float16 but x_gates"),
    ((_G.bfloat16(), _G.bfloat16(), _C.half()), TypeError, "c must have the gates' dtype"),
    ((_G[0], _G, _C), ValueError, "x_gates must be 2-D"),
    ((_G, _G[:, :8], _C), ValueError, "h_gates has shape"),
    ((_G[:, :10], _G[:, :10], _C), ValueError, r"x_gates must be \[B, 4H\]"),
    ((_G, _G, _C[:, :2]), ValueError, r"c must be \[B, H\] = \[2, 3\]"),
    ((_G, _G, _C[:1]), ValueError, r"c must be \[B, H\]"),
    ((_G, _G, _C.to("meta")), ValueError, "c is on meta but x_gates is on cpu"),
])
def test_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        lstm_cell(*args)


@pytest.mark.parametrize("device,backend", backend_params("lstm_cell"))
def test_empty_batch(device, backend):
    xg, hg, c = inputs(0, 4, torch.float32, torch.float32, device)
    with genfast.backend(backend):
        h, c_new = lstm_cell(xg, hg, c)
    assert h.shape == c_new.shape == (0, 4)
