"""genfast.ops.attention: every backend against the fp64 spec, with torch's own low-precision error as the yardstick.

Rule (CONTRIBUTING.md, section 3): ``err(backend) <= 2 * err(torch) + FLOOR[dtype]``, where err is the largest absolute
difference from ``attention_ref`` run in fp64 on the same (rounded) inputs, and err(torch) is that of the same
reference math run in the low dtype itself. Outputs, lse and the gradients of q, k and v are all checked.
Shapes stay tiny: the Triton kernels run in the interpreter here.
"""

import importlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import genfast
from genfast.ops import attention, attention_ref
from genfast.ops.attention import dropout_keep
from tests.attention_checks import (
    FLOOR,
    assert_sdpa_dtype_choice_meets_the_rule,
    max_error,
    run_forward_backward,
    seed_of,
)
from tests.conftest import backend_params
from tests.tolerance import assert_within_tolerance

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PARAMS = backend_params("attention")


def _make(shape_q, shape_k, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(shape_k, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(shape_k, generator=gen, dtype=torch.float64).to(dtype)
    return [t.to(device) for t in (q, k, v)]


def _check_against_spec(device, backend, q, k, v, **kwargs):
    dtype = q.dtype
    gen = torch.Generator().manual_seed(99)
    w_out = torch.randn(q.shape, generator=gen, dtype=torch.float64).to(device)
    w_lse = torch.randn(q.shape[:3], generator=gen, dtype=torch.float64).to(device)

    def ours(q, k, v):
        with genfast.backend(backend):
            return attention(q, k, v, return_lse=True, **kwargs)

    def spec(compute_dtype):
        return lambda q, k, v: attention_ref(q, k, v, return_lse=True, compute_dtype=compute_dtype, **kwargs)

    got = run_forward_backward(ours, q, k, v, w_out, w_lse)
    exact = run_forward_backward(spec(torch.float64), q.double(), k.double(), v.double(), w_out, w_lse)
    torch_low = run_forward_backward(spec(dtype), q, k, v, w_out, w_lse)
    # The O(N) backward recomputes P from the lse the forward stored in fp32 (for every dtype), so P carries a
    # factor exp(+-dlse) with dlse about torch's own fp32 lse error; the gradients are allowed 2 * dlse * max|grad|
    # on top (it matters only in fp32, where it is a few ulps).
    lse_err_fp32 = max_error(attention_ref(q.float(), k.float(), v.float(), return_lse=True, **kwargs)[1], exact[1])
    for name, g, e, t in zip(("out", "lse", "dq", "dk", "dv"), got, exact, torch_low):
        assert g.dtype == (torch.float32 if name == "lse" else dtype) and g.shape == e.shape, name
        ours_err, torch_err = max_error(g, e), max_error(t, e)
        finite = torch.isfinite(e)
        magnitude = e[finite].abs().max().item() if finite.any() else 0.0
        floor = FLOOR[dtype] + torch.finfo(dtype).eps * magnitude
        if name in ("dq", "dk", "dv"):
            floor += 2 * lse_err_fp32 * magnitude
        assert_within_tolerance(name, ours_err, torch_err, floor)


# (q shape, k shape, options): odd sizes, GQA/MQA, cross-attention, every position rule.
CASES = {
    "n1": ((1, 2, 1, 16), (1, 2, 1, 16), {}),
    "n17-d64": ((1, 2, 17, 64), (1, 2, 17, 64), {}),
    "n17-d80-causal": ((2, 2, 17, 80), (2, 2, 17, 80), {"causal": True}),
    "gqa-cross-causal": ((1, 4, 9, 32), (1, 2, 33, 32), {"causal": True}),
    "mqa-nq>nk-causal": ((1, 2, 33, 16), (1, 1, 9, 16), {"causal": True}),
    "window": ((1, 2, 40, 16), (1, 2, 40, 16), {"window": (5, 3)}),
    # Wider than a tile, so some key tiles are seen in full by every row of a query block (the unmasked run).
    "wide-window-cross": ((1, 2, 48, 16), (1, 2, 64, 16), {"window": (20, 18)}),
    "window-left-causal-cross": ((1, 2, 20, 16), (1, 2, 37, 16), {"window": (6, None), "causal": True}),
    "d96-scale": ((1, 2, 17, 96), (1, 2, 23, 96), {"scale": 0.3}),
}


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_spec(device, backend, dtype, case):
    shape_q, shape_k, options = CASES[case]
    q, k, v = _make(shape_q, shape_k, dtype, device)
    _check_against_spec(device, backend, q, k, v, **options)


def _masks(kind, b, h, nq, nk, dtype, device):
    gen = torch.Generator().manual_seed(5)
    if kind == "bool-2d":
        m = torch.rand(nq, nk, generator=gen) > 0.3
        m[3] = False  # a row that sees nothing: out 0, lse -inf
        return m.to(device)
    if kind == "bool-key-padding":  # [B, 1, 1, Nk], what MultiheadAttention's key_padding_mask becomes
        m = torch.ones(b, 1, 1, nk, dtype=torch.bool)
        m[0, ..., nk - 5:] = False
        return m.to(device)
    if kind == "additive-heads":  # [1, Hq, Nq, Nk] in q's dtype, with -inf entries and a fully -inf row
        m = torch.randn(1, h, nq, nk, generator=gen).to(dtype)
        m[0, 0, 2] = -math.inf
        m[0, 1, :, 4] = -math.inf
        return m.to(device)
    if kind == "additive-fp32-row":  # [Nk] fp32 (ALiBi-like bias along keys)
        return (-0.1 * torch.arange(nk, dtype=torch.float32)).to(device)
    raise AssertionError(kind)


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["bool-2d", "bool-key-padding", "additive-heads", "additive-fp32-row"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_masks(device, backend, dtype, kind, causal):
    q, k, v = _make((2, 2, 17, 16), (2, 2, 21, 16), dtype, device, seed=1)
    _check_against_spec(device, backend, q, k, v, attn_mask=_masks(kind, 2, 2, 17, 21, dtype, device),
                        causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kwargs", [{}, {"causal": True}, {"attn_mask": "bool"}, {"scale": 0.5}],
                         ids=["plain", "causal", "bool-mask", "scale"])
def test_reference_sdpa_path_meets_the_rule(dtype, kwargs):
    """On CPU, auto calls torch's SDPA in the input dtype where SDPA has the features; it obeys the same rule."""
    q, k, v = _make((2, 4, 33, 16), (2, 2, 33, 16), dtype, "cpu", seed=2)
    if kwargs.get("attn_mask") == "bool":
        mask = torch.rand(33, 33, generator=torch.Generator().manual_seed(1)) > 0.5
        mask[7] = False
        kwargs = {"attn_mask": mask}
    fast = attention(q, k, v, **kwargs)
    exact = attention_ref(q.double(), k.double(), v.double(), **kwargs)
    torch_low = attention_ref(q, k, v, compute_dtype=dtype, **kwargs)
    floor = FLOOR[dtype] + torch.finfo(dtype).eps * exact.abs().max().item()
    assert fast.dtype == dtype
    assert_within_tolerance("out", max_error(fast, exact), max_error(torch_low, exact), floor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("upcast", [False, True], ids=["native-half", "fp32-backward"])
def test_reference_sdpa_backward_meets_the_rule(monkeypatch, dtype, upcast):
    """The SDPA path's gradients, in the input dtype and through fp32 (what a CPU without native half matmuls
    takes when a gradient is needed), both obey the rule and keep the input dtype; and the fp32 path really ran:
    its gradients differ from the half kernel's."""
    q, k, v = _make((2, 4, 33, 16), (2, 2, 33, 16), dtype, "cpu", seed=4)
    w_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def ours(q, k, v):
        return attention(q, k, v, causal=True)

    def spec(q, k, v, compute_dtype):
        return attention_ref(q, k, v, causal=True, compute_dtype=compute_dtype)

    assert_sdpa_dtype_choice_meets_the_rule(monkeypatch, upcast, ours, spec, q, k, v, w_out)


def test_cpu_half_probe_only_lists_half_dtypes():
    from genfast.ops._attention_common import CPU_SLOW_HALF_DTYPES

    assert CPU_SLOW_HALF_DTYPES <= {torch.bfloat16, torch.float16}


def test_reference_large_n_matches_math():
    """N = 1000 through auto on CPU (torch's SDPA) against the written-out math; D = 80."""
    q, k, v = _make((1, 2, 1000, 80), (1, 2, 1000, 80), torch.float32, "cpu", seed=3)
    for causal in (False, True):
        out = attention(q, k, v, causal=causal)
        torch.testing.assert_close(out, attention_ref(q, k, v, causal=causal), atol=2e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="N = 1000 is too slow for the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_large_n_on_gpu(dtype, causal):
    q, k, v = _make((2, 4, 1000, 80), (2, 2, 1000, 80), dtype, "cuda", seed=4)
    _check_against_spec("cuda", "triton", q, k, v, causal=causal)


# ------------------------------------------------------------------------------------------ dropout
@pytest.mark.parametrize("device,backend", PARAMS + [pytest.param("cpu", "reference", id="cpu-reference")])
@pytest.mark.parametrize("options", [{}, {"causal": True, "attn_mask": "key-padding"}], ids=["plain", "masked"])
def test_dropout_exact(device, backend, options):
    """Same seed -> the same keep mask as the reference, so outputs and gradients match exactly (fp32)."""
    q, k, v = _make((2, 4, 17, 16), (2, 2, 19, 16), torch.float32, device, seed=6)
    options = dict(options)
    if "attn_mask" in options:
        options["attn_mask"] = _masks("bool-key-padding", 2, 4, 17, 19, None, device)
    p = 0.3

    def ours(q, k, v):
        with genfast.backend(backend):
            return attention(q, k, v, dropout_p=p, return_lse=True, generator=torch.Generator().manual_seed(7),
                             **options)

    def spec(q, k, v):
        return attention_ref(q, k, v, dropout_p=p, return_lse=True, seed=seed_of(7).to(device), **options)

    w_out = torch.randn(q.shape, dtype=torch.float64, device=device)
    w_lse = torch.randn(q.shape[:3], dtype=torch.float64, device=device)
    got, want = run_forward_backward(ours, q, k, v, w_out, w_lse), run_forward_backward(spec, q, k, v, w_out, w_lse)
    for g, w in zip(got, want):
        assert max_error(g, w) < 2e-5
    # Reproducible for a seed, and a different seed drops different elements.
    again = run_forward_backward(ours, q, k, v, w_out, w_lse)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    with genfast.backend(backend):
        other = attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(8), **options)
    assert not torch.allclose(other, got[0])


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_kept_fraction(device, backend, p):
    """With q = 0 every key gets probability 1/Nk, and one-hot values read the keep mask out of the output."""
    b, h, n = 1, 2, 64
    q = torch.zeros(b, h, n, n, device=device)
    k = torch.zeros(b, h, n, n, device=device)
    v = torch.eye(n, device=device).expand(b, h, n, n)
    with genfast.backend(backend):
        out = attention(q, k, v, dropout_p=p, generator=torch.Generator().manual_seed(11))
    scaled = out * n * (1 - p)
    kept = scaled > 0.5
    torch.testing.assert_close(scaled[kept], torch.ones_like(scaled[kept]))  # kept values scaled by 1/(1-p)
    assert torch.all(scaled[~kept] == 0)
    total = kept.numel()
    frac = kept.float().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / total)
    # And the kept elements are exactly the ones the reference's keep mask names.
    assert torch.equal(kept.cpu(), dropout_keep(seed_of(11), (b, h, n, n), p))


# ------------------------------------------------------------------------------------------ bad input
def _bad_cases():
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    meta_k = torch.empty(1, 2, 8, 16, device="meta")
    return [
        ((q, k, torch.randn(1, 2, 8, 32)), {}, ValueError, "v has shape"),
        ((q, torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)), {}, ValueError, "head dims differ"),
        ((q, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16)), {}, ValueError, "multiple of the key heads"),
        ((q, k, v), {"attn_mask": torch.ones(7, 8, dtype=torch.bool)}, ValueError, "attn_mask of shape"),
        ((q, k, v), {"attn_mask": torch.ones(2, 1, 1, 8, 8, dtype=torch.bool)}, ValueError, "attn_mask of shape"),
        ((q, k, v), {"attn_mask": torch.ones(8, 8, dtype=torch.int32)}, TypeError, "attn_mask must have dtype"),
        ((q.double(), k.double(), v.double()), {}, TypeError, "q must have dtype"),
        ((q.half(), k, v), {}, TypeError, "k has dtype"),
        ((q, meta_k, v), {}, ValueError, "k is on meta"),
        ((q[0], k, v), {}, ValueError, "q must be 4-D"),
        ((q, k, v), {"dropout_p": 1.0}, ValueError, "dropout_p must be in"),
        ((q, k, v), {"dropout_p": "0.1"}, TypeError, "dropout_p must be a real number"),
        ((q, k, v), {"scale": float("inf")}, ValueError, "scale must be finite"),
        ((q, k, v), {"window": (3,)}, TypeError, "window must be"),
        ((q, k, v), {"window": (-2, 0)}, ValueError, r"window\[0\]"),
        ((q, k, v), {"window": (1, 2.5)}, TypeError, r"window\[1\]"),
        ((q, k, v), {"causal": 1}, TypeError, "causal must be a bool"),
        ((q, k, v), {"generator": 3}, TypeError, "generator must be"),
        ((q, k, torch.randn(1, 2, 0, 16)), {}, ValueError, "v has shape"),
        ((q, torch.randn(1, 2, 0, 16), torch.randn(1, 2, 0, 16)), {}, ValueError, "at least one key"),
        ((torch.randn(2, 4, 8, 16), k, v), {}, ValueError, "k has batch"),
        # Calls that look everyday but are not: the fast path must hand them to the checks (issue 26).
        ((q, k, v), {"dropout_p": False}, TypeError, "dropout_p must be a real number"),
        ((q, k, v), {"return_lse": 1}, TypeError, "return_lse must be a bool"),
        ((q, k.transpose(0, 1), v.transpose(0, 1)), {}, ValueError, "k has batch"),
        ((q, k, v, ), {"scale": None, "window": (None, None), "causal": None}, TypeError, "causal must be a bool"),
    ]


@pytest.mark.parametrize("args,kwargs,error,match", _bad_cases())
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        attention(*args, **kwargs)


class _WrittenTensors(TorchDispatchMode):
    """The aten ops (but SDPA's own kernels) that write a tensor of more than one element while active; views,
    which share an input's storage and write nothing, are not counted."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "scaled_dot_product" not in str(func):
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() > 1 and t.untyped_storage().data_ptr() not in inputs:
                    self.ops.append(str(func))
        return out


def _written(fn, q, k, v):
    with _WrittenTensors() as forward:
        out = fn(q, k, v)
    with _WrittenTensors() as backward:
        out.backward(torch.ones_like(out))
    return sorted(forward.ops), sorted(backward.ops)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_nan_guarantee_adds_no_full_tensor_pass_on_the_cpu_sdpa_path(dtype, causal):
    """Issue 26: the NaN rule cost four full-tensor passes (isnan, any, where, and where's backward) around SDPA.

    Now a call without NaN writes no tensor that torch's own SDPA call does not write (one reduction of q to a
    scalar checks), forward and backward; a call with a NaN still gets its row back as NaN (tests/test_errors.py
    checks every backend)."""
    if dtype in importlib.import_module("genfast.ops._attention_common").CPU_SLOW_HALF_DTYPES:
        pytest.skip("the backward runs SDPA in fp32 here: the casts are passes of their own")
    made = [t.requires_grad_(True) for t in _make((2, 4, 33, 16), (2, 2, 33, 16), dtype, "cpu", seed=12)]
    ours = _written(lambda q, k, v: attention(q, k, v, causal=causal), *made)
    theirs = _written(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=causal, enable_gqa=True), *(t.detach().requires_grad_(True) for t in made))
    assert ours == theirs
    with torch.no_grad():
        bad = made[0].detach().clone()
        bad[1, 3, 7, 5] = float("nan")
        got = attention(bad, made[1], made[2], causal=causal)
        want = attention(made[0], made[1], made[2], causal=causal)
    assert got[1, 3, 7].isnan().all() and got.isnan().any(dim=-1).sum() == 1
    torch.testing.assert_close(got[0], want[0])


def test_mask_requiring_grad_is_refused():
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="attn_mask must not require grad"):
        attention(q, q, q, attn_mask=torch.zeros(4, 4, requires_grad=True))


def test_head_dim_above_triton_limit_falls_back_under_auto():
    dispatch = genfast._backend.DISPATCHERS["attention"]
    assert "head dims up to 256" in dispatch.why_not("triton", torch.device("cuda"), torch.float16, head_dim=320)


# ------------------------------------------------------------------------------------------ opcheck, compile
@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("options", [(False, 0.0, -1, -1, None), (True, 0.2, 3, -1, "bool")],
                         ids=["plain", "causal-dropout-window-mask"])
def test_opcheck(device, backend, options):
    causal, p, left, right, mask_kind = options
    q, k, v = _make((1, 2, 5, 16), (1, 1, 7, 16), torch.float32, device, seed=9)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    mask = (torch.arange(7, device=device) < 6).expand(1, 2, 5, 7) if mask_kind else None
    seed = torch.tensor([123], device=device) if p else None
    fwd = torch.ops.genfast.attention_fwd_triton
    torch.library.opcheck(fwd, (q, k, v, mask, seed, causal, p, 0.25, left, right))
    out, lse = fwd(q, k, v, mask, seed, causal, p, 0.25, left, right)
    grads = (torch.randn_like(out), torch.randn_like(lse))
    torch.library.opcheck(torch.ops.genfast.attention_bwd_triton,
                          (*grads, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), mask, seed, causal,
                           p, 0.25, left, right))


@pytest.mark.parametrize("device,backend", PARAMS + [pytest.param("cpu", "reference", id="cpu-reference")])
def test_compile_fullgraph(device, backend):
    q, k, v = _make((1, 2, 9, 16), (1, 1, 9, 16), torch.float32, device, seed=10)
    mask = torch.rand(9, 9, generator=torch.Generator().manual_seed(0)).to(device) > 0.2

    def fn(q, k, v):
        out, lse = attention(q, k, v, causal=True, attn_mask=mask, return_lse=True)
        return out * 2 + lse[..., None]

    with genfast.backend(backend):
        compiled = torch.compile(fn, fullgraph=True)
        torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))


@pytest.mark.parametrize("upcast", [False, True], ids=["native-half", "fp32-backward"])
def test_compile_fullgraph_half_backward_on_cpu(monkeypatch, upcast):
    """The SDPA path's dtype choice traces under torch.compile(fullgraph=True) with gradients, both ways."""
    common = importlib.import_module("genfast.ops._attention_common")  # where sdpa_inputs reads it
    monkeypatch.setattr(common, "CPU_SLOW_HALF_DTYPES", frozenset({torch.bfloat16} if upcast else ()))
    q, k, v = (t.requires_grad_(True) for t in _make((1, 2, 9, 16), (1, 1, 9, 16), torch.bfloat16, "cpu", seed=11))

    def fn(q, k, v):
        return attention(q, k, v, causal=True)

    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(q, k, v)
    got_grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    want = fn(q, k, v)
    want_grads = torch.autograd.grad(want.float().square().sum(), (q, k, v))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, w)
