"""Sampling ops: value checks folded into the kernels, raw-op guards, noise checks, gradients, on every backend."""

import re
from pathlib import Path

import pytest
import torch

import genfast
from genfast.kernels._sampling_flags import SamplingFlag
from genfast.ops import filter_logits, filter_logits_ref, sample_tokens, sample_tokens_ref
from genfast.ops.sampling import _FLAG_MESSAGES, _value_flags_ref
from tests.conftest import backend_params

CSRC = Path(__file__).resolve().parents[1] / "csrc"
_CPP_FLAG = re.compile(r"constexpr\s+int32_t\s+kFlag(\w+)\s*=\s*(\d+)\s*;")

BACKENDS = [pytest.param("cpu", "reference", id="cpu-reference")] + backend_params("sample_tokens")


def _bad_values():
    x = torch.randn(3, 17, generator=torch.Generator().manual_seed(0))
    nan, pos_inf, neg_inf = x.clone(), x.clone(), x.clone()
    nan[2, 16] = float("nan")
    pos_inf[1, 0] = float("inf")
    neg_inf[1] = float("-inf")
    return [
        (dict(logits=nan), r"logits must not contain NaN \(row 2\)"),
        (dict(logits=pos_inf), r"logits must not contain \+inf \(row 1\)"),
        (dict(logits=neg_inf), r"logits must have a finite value in every row \(a row is all -inf\) \(row 1\)"),
        (dict(logits=x * 1e37, temperature=1e-3), r"temperature is so small .* overflows float32 \(row 0\)"),
        (dict(logits=x, temperature=torch.tensor([1.0, -0.5, 1.0])), r"temperature must be finite and >= 0 \(row 1\)"),
        (dict(logits=x, top_k=torch.tensor([0, 0, -1])), r"top_k must be >= 0 \(row 2\)"),
        (dict(logits=x, top_p=torch.tensor([0.5, float("nan"), 1.0])), r"top_p must be in \(0, 1\] \(row 1\)"),
        (dict(logits=x, top_p=0.0), r"top_p must be in \(0, 1\] \(row 0\)"),
        (dict(logits=x, min_p=torch.tensor([0.0, 0.0, 1.5])), r"min_p must be in \[0, 1\] \(row 2\)"),
        (dict(logits=x, prev_tokens=torch.tensor([[0], [17], [3]])), r"prev_tokens must hold token ids in \[0, 17\)"),
        (dict(logits=x, repetition_penalty=torch.tensor([1.0, 0.0, 1.0])), "repetition_penalty must be finite"),
    ]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(_bad_values())))
def test_value_errors_on_every_backend(device, backend, case):
    kwargs, match = _bad_values()[case]
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with genfast.backend(backend):
        with pytest.raises(ValueError, match="filter_logits: " + match):
            filter_logits(**kwargs)
        with pytest.raises(ValueError, match="sample_tokens: " + match):
            sample_tokens(**kwargs)
        # validate=False skips the checks and stays memory-safe.
        tokens = sample_tokens(**kwargs, validate=False)
    assert ((tokens >= 0) & (tokens < 17)).all()


@pytest.mark.parametrize("device,backend", backend_params("filter_logits"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_flags_equal_the_reference_flags(device, backend, dtype):
    # Each row carries several faults at once: every bit must match, not only the first error raised.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 97, generator=g)
    x[0, 5] = float("nan")
    x[0, 7] = float("inf")
    x[1] = float("-inf")
    x[2, :] = float("nan")
    x[3, 40] = 6e4 if dtype == torch.float16 else 3e38
    x[4, 96] = float("-inf")
    knobs = (torch.tensor([1.0, float("nan"), 1.0, 1e-3, -1.0, float("inf")]),
             torch.tensor([0, -4, 5, 0, 2**40, -1]),
             torch.tensor([1.0, 0.0, 1.5, 0.9, float("nan"), 1e-9]),
             torch.tensor([0.0, -0.1, 1.0, 2.0, 0.5, float("nan")]))
    x = x.to(dtype).to(device)
    knobs = tuple(k.to(device) for k in knobs)
    op = torch.ops.genfast.filter_logits_triton if backend == "triton" else torch.ops.genfast.filter_logits
    _, flags = op(x, *knobs)
    expected = _value_flags_ref(x, *knobs)
    assert flags.dtype == torch.int32
    assert flags.cpu().tolist() == expected.cpu().tolist()
    assert expected.tolist()[0] == 1 | 2 and expected.tolist()[1] & 4 and expected.tolist()[2] & 4  # the spec's own


@pytest.mark.parametrize("device,backend", backend_params("sample_tokens"))
def test_raw_ops_refuse_an_empty_vocabulary(device, backend):
    suffix = "_triton" if backend == "triton" else ""
    knobs = (torch.ones(2), torch.zeros(2, dtype=torch.long), torch.ones(2), torch.zeros(2))
    knobs = tuple(k.to(device) for k in knobs)
    x = torch.zeros(2, 0, device=device)
    error = ValueError if backend == "triton" else RuntimeError
    with pytest.raises(error, match="between 1 and 2.*24 - 1 columns"):
        getattr(torch.ops.genfast, "sample_tokens" + suffix)(x, *knobs, None, torch.tensor([1], device=device))
    with pytest.raises(error, match="between 1 and 2.*24 - 1 columns"):
        getattr(torch.ops.genfast, "filter_logits" + suffix)(x, *knobs)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), 1.0, -1e-7, 2.0])
def test_noise_outside_unit_interval_is_refused(device, backend, bad):
    x = torch.randn(2, 17, device=device)
    noise = torch.rand(2, 17, generator=torch.Generator().manual_seed(0)).to(device)
    noise[1, 16] = bad
    with genfast.backend(backend):
        with pytest.raises(ValueError, match=r"sample_tokens: noise must hold values in \[0, 1\)"):
            sample_tokens(x, noise=noise)
    with pytest.raises(ValueError, match=r"sample_tokens_ref: noise must hold values in \[0, 1\)"):
        sample_tokens_ref(x, noise=noise)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_zero_noise_is_legal_and_backends_agree(device, backend):
    # u = 0 scores -inf; a row whose kept tokens all drew 0 returns its argmax on every backend.
    x = torch.randn(3, 17, generator=torch.Generator().manual_seed(2)).to(device)
    noise = torch.rand(3, 17, generator=torch.Generator().manual_seed(3)).to(device)
    noise[0] = 0.0
    noise[1, ::2] = 0.0
    with genfast.backend(backend):
        got = sample_tokens(x, noise=noise, top_k=4)
    expected = sample_tokens_ref(x, noise=noise, top_k=4)
    assert torch.equal(got.cpu(), expected.cpu())
    assert got[0].item() == x[0].argmax().item()


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_filter_logits_gradient_matches_the_reference(device, backend, dtype):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(3, 97, generator=g) * 2).to(dtype).to(device)
    weight = torch.randn(3, 97, generator=g).to(device)
    kw = dict(temperature=torch.tensor([0.7, 0.0, 1.3], device=device), top_k=9, top_p=0.9,
              repetition_penalty=1.2, prev_tokens=torch.tensor([[1, 2], [3, 3], [0, 96]], device=device))

    def grad_of(fn):
        leaf = x.clone().requires_grad_(True)
        out = fn(leaf, **kw)
        out.masked_fill(torch.isinf(out), 0.0).mul(weight).sum().backward()
        return out.detach(), leaf.grad

    with genfast.backend(backend):
        out, grad = grad_of(filter_logits)
    ref_out, ref_grad = grad_of(filter_logits_ref)
    assert torch.equal(torch.isinf(out), torch.isinf(ref_out))
    assert grad is not None and grad.dtype == dtype
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=0)
    assert (grad[torch.isinf(ref_out)] == 0).all() and (grad[~torch.isinf(ref_out)] != 0).any()


def _folded(name: str) -> str:
    """SamplingFlag.ALL_NEG_INF and kFlagAllNegInf both fold to 'allneginf'."""
    return name.replace("_", "").lower()


def test_flag_bits_equal_the_cpp_header():
    # The C++ kernels' bits (csrc/common/sampling.h) and SamplingFlag (the Triton kernel's and the reference's)
    # are written twice, once per language: this test is what keeps them one contract.
    cpp = {_folded(name): int(value) for name, value in _CPP_FLAG.findall((CSRC / "common/sampling.h").read_text())}
    python = {_folded(flag.name): int(flag) for flag in SamplingFlag}
    assert cpp == python
    assert sorted(python.values()) == [1 << i for i in range(len(python))]  # one bit each


def test_flag_bits_are_defined_once_in_csrc():
    defined = sorted(str(path.relative_to(CSRC)) for path in CSRC.rglob("*")
                     if path.suffix in {".h", ".cuh", ".cpp", ".cu"} and _CPP_FLAG.search(path.read_text()))
    assert defined == ["common/sampling.h"]


def test_every_flag_has_one_error_message():
    flags = [flag for flag, _, _ in _FLAG_MESSAGES]
    assert sorted(flags) == sorted(SamplingFlag) and len(set(flags)) == len(flags)
