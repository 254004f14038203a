"""Token sampling: every backend against the sort-based reference, the reference against transformers."""

import math

import pytest
import torch

import genfast
from genfast.ops import filter_logits, filter_logits_ref, philox_noise, sample_tokens, sample_tokens_ref
from tests.conftest import backend_params

# The kernels compute exactly what the reference computes (the same fp32 division, the same threshold
# tests), so kept values must be bit-equal for every input dtype: the tolerance is 0, not a guess.
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOLERANCE = {torch.float32: 0.0, torch.float16: 0.0, torch.bfloat16: 0.0}

KNOBS = {
    "none": dict(),
    "top_k": dict(top_k=50),
    "top_p": dict(top_p=0.9),
    "min_p": dict(min_p=0.05),
    "all": dict(temperature=0.7, top_k=40, top_p=0.8, min_p=0.02),
    "penalty": dict(repetition_penalty=1.3, top_k=20, top_p=0.95),
    "greedy": dict(temperature=0.0, top_k=5),
    "top_k_big": dict(top_k=999, top_p=0.999),
}


def _logits(batch, vocab, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=g) * 3
    if vocab > 20:
        x[:, 3:9] = x[:, 2:3]  # ties, some likely at a boundary
        x[:, 11] = float("-inf")
    return x.to(dtype).to(device)


def _prev(batch, vocab, device="cpu", length=7):
    g = torch.Generator().manual_seed(1)
    prev = torch.randint(0, vocab, (batch, length), generator=g)
    prev[:, 1] = prev[:, 0]  # duplicates must be penalised once
    return prev.to(device)


def _args(name, batch, vocab, device):
    kw = dict(KNOBS[name])
    if "repetition_penalty" in kw:
        kw["prev_tokens"] = _prev(batch, vocab, device)
    return kw


def assert_same_filter(got, expected, dtype=torch.float32):
    assert got.dtype == torch.float32 and got.shape == expected.shape
    got, expected = got.cpu(), expected.cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(expected)), "different kept sets"
    kept = ~torch.isinf(expected)
    torch.testing.assert_close(got[kept], expected[kept], rtol=0, atol=TOLERANCE[dtype])


SHAPES = [(1, 1), (2, 17), (1, 97), (2, 1000), (3, 257)]  # odd vocabularies: 1, 17, 97, 257


@pytest.mark.parametrize("device,backend", backend_params("filter_logits"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("knobs", list(KNOBS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_filter_matches_reference(device, backend, dtype, knobs, shape):
    x = _logits(*shape, dtype, device)
    kw = _args(knobs, *shape, device)
    with genfast.backend(backend):
        got = filter_logits(x, **kw)
    assert_same_filter(got, filter_logits_ref(x, **kw), dtype)


@pytest.mark.parametrize("device,backend", backend_params("sample_tokens"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("knobs", list(KNOBS))
@pytest.mark.parametrize("vocab", [97, 1000])
def test_sample_matches_reference_with_shared_noise(device, backend, dtype, knobs, vocab):
    batch = 4
    x = _logits(batch, vocab, dtype, device)
    kw = _args(knobs, batch, vocab, device)
    noise = torch.rand(batch, vocab, generator=torch.Generator().manual_seed(3)).clamp_min(1e-6).to(device)
    with genfast.backend(backend):
        got = sample_tokens(x, noise=noise, **kw)
    assert got.dtype == torch.int64 and got.shape == (batch,)
    assert torch.equal(got.cpu(), sample_tokens_ref(x, noise=noise, **kw).cpu())


@pytest.mark.parametrize("device,backend", backend_params("sample_tokens"))
@pytest.mark.parametrize("knobs", ["none", "all"])
def test_in_kernel_philox_noise_is_the_documented_stream(device, backend, knobs):
    batch, vocab = 3, 1000
    x = _logits(batch, vocab, device=device)
    kw = _args(knobs, batch, vocab, device)
    with genfast.backend(backend):
        got = sample_tokens(x, generator=torch.Generator(device).manual_seed(42), **kw)
    seed = torch.randint(0, 2**62, (1,), generator=torch.Generator(device).manual_seed(42), device=device)
    noise = philox_noise(seed, batch * vocab).view(batch, vocab)
    assert torch.equal(got.cpu(), sample_tokens_ref(x, noise=noise, **kw).cpu())


@pytest.mark.parametrize("device,backend", backend_params("filter_logits"))
def test_per_row_knobs(device, backend):
    batch, vocab = 4, 300
    x = _logits(batch, vocab, device=device)
    kw = dict(
        temperature=torch.tensor([0.0, 0.5, 1.0, 2.0], device=device),
        top_k=torch.tensor([0, 3, 300, 17], device=device),
        top_p=torch.tensor([1.0, 0.5, 0.2, 0.9], device=device),
        min_p=torch.tensor([0.0, 0.1, 0.0, 0.3], device=device),
        repetition_penalty=torch.tensor([1.0, 1.5, 0.7, 1.2], device=device),
        prev_tokens=_prev(batch, vocab, device),
    )
    with genfast.backend(backend):
        got = filter_logits(x, **kw)
        tokens = sample_tokens(x, generator=torch.Generator(device).manual_seed(0), **kw)
    expected = filter_logits_ref(x, **kw)
    assert_same_filter(got, expected)
    assert (~torch.isinf(got[0])).sum() == 1  # greedy row keeps its argmax only
    assert torch.isfinite(expected.gather(1, tokens[:, None].cpu())).all()


@pytest.mark.parametrize("device,backend", backend_params("filter_logits"))
def test_ties_and_greedy(device, backend):
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [-0.0, 0.0, -1.0, -0.0, -2.0, -3.0]], device=device)
    with genfast.backend(backend):
        top2 = filter_logits(x, top_k=2)  # the 2nd largest ties with the 1st and 3rd: all three stay
        top_p = filter_logits(x, top_p=0.01)  # the max's ties are kept by top-p as well
        greedy = filter_logits(x, temperature=0.0)
        token = sample_tokens(x, temperature=0.0)
    assert (~torch.isinf(top2)).tolist() == [[False, True, True, False, True, False], [True, True, False, True, False,
                                                                                         False]]
    assert torch.equal(torch.isinf(top_p), torch.isinf(top2))
    assert token.tolist() == [1, 0]  # lowest index of the maximum (-0.0 ties with 0.0)
    assert (~torch.isinf(greedy)).sum(-1).tolist() == [1, 1]


@pytest.mark.slow
def test_cpu_large_batch_and_vocab():
    pytest.importorskip("genfast._C")
    for batch, vocab, kw in [(999, 97, KNOBS["all"]), (2, 50257, dict(top_k=50, top_p=0.9)), (2, 50257, KNOBS["top_p"]),
                             (2, 50257, dict(top_k=3000, min_p=0.01))]:
        x = _logits(batch, vocab)
        with genfast.backend("cpu"):
            got = filter_logits(x, **kw)
            tokens = sample_tokens(x, noise=torch.rand(batch, vocab).clamp_min(1e-6), **kw)
        assert_same_filter(got, filter_logits_ref(x, **kw))
        assert ((tokens >= 0) & (tokens < vocab)).all()


# ---------------------------------------------------------------------------- transformers semantics
def _hf_processors(temperature, top_k, top_p, min_p, penalty):
    from transformers.generation import logits_process as lp

    procs = []
    if penalty != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(penalty))
    if temperature != 1.0:
        procs.append(lp.TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(lp.TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(lp.TopPLogitsWarper(top_p))
    if min_p:
        procs.append(lp.MinPLogitsWarper(min_p))
    return lp.LogitsProcessorList(procs)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p,penalty", [
    (1.0, 50, 1.0, 0.0, 1.0), (1.0, 0, 0.9, 0.0, 1.0), (1.0, 0, 1.0, 0.05, 1.0), (0.7, 40, 0.8, 0.02, 1.3),
    (1.5, 0, 0.95, 0.0, 0.8), (1.0, 1, 1.0, 0.0, 1.0),
])
def test_reference_matches_transformers(temperature, top_k, top_p, min_p, penalty):
    pytest.importorskip("transformers")
    batch, vocab = 8, 500
    x = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(7)) * 4  # continuous: no ties
    prev = _prev(batch, vocab)
    expected = _hf_processors(temperature, top_k, top_p, min_p, penalty)(prev, x.clone())
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=penalty,
              prev_tokens=prev)
    assert_same_filter(filter_logits_ref(x, **kw), expected)
    assert_same_filter(filter_logits(x, **kw), expected)


# ---------------------------------------------------------------------------- bad input
def _bad_cases():
    x = torch.randn(2, 10)
    nan = x.clone()
    nan[1, 3] = float("nan")
    neg_inf = x.clone()
    neg_inf[0] = float("-inf")
    pos_inf = x.clone()
    pos_inf[0, 0] = float("inf")
    return [
        (dict(logits=[[1.0]]), TypeError, "logits must be a torch.Tensor"),
        (dict(logits=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "logits must have dtype"),
        (dict(logits=torch.zeros(3)), ValueError, "logits must be 2-D"),
        (dict(logits=torch.zeros(0, 3)), ValueError, "logits must have at least one row"),
        (dict(logits=nan), ValueError, "logits must not contain NaN"),
        (dict(logits=pos_inf), ValueError, r"logits must not contain \+inf"),
        (dict(logits=neg_inf), ValueError, "logits must have a finite value in every row"),
        (dict(logits=x, top_k=-1), ValueError, "top_k must be >= 0"),
        (dict(logits=x, top_k=2.5), TypeError, "top_k must be an int"),
        (dict(logits=x, top_k=torch.tensor([1.0, 2.0])), TypeError, "top_k must be an integer tensor"),
        (dict(logits=x, top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
        (dict(logits=x, top_p=1.5), ValueError, "top_p must be in"),
        (dict(logits=x, top_p=torch.tensor([0.5, 1.2])), ValueError, "top_p must be in"),
        (dict(logits=x, min_p=-0.1), ValueError, r"min_p must be in \[0, 1\]"),
        (dict(logits=x, min_p=1.1), ValueError, "min_p must be in"),
        (dict(logits=x, temperature=-1.0), ValueError, "temperature must be finite and >= 0"),
        (dict(logits=x, temperature=float("nan")), ValueError, "temperature must not be NaN"),
        (dict(logits=x * 1e37, temperature=1e-3), ValueError, "temperature is so small"),
        (dict(logits=x, temperature=torch.tensor([1.0])), ValueError, r"temperature must have shape \(2,\)"),
        (dict(logits=x, temperature=torch.tensor([1, 2])), TypeError, "temperature must be a floating-point"),
        (dict(logits=x, temperature="hot"), TypeError, "temperature must be a real number"),
        (dict(logits=x, repetition_penalty=0.0), ValueError, "repetition_penalty must be finite and > 0"),
        (dict(logits=x, prev_tokens=torch.tensor([[1], [10]])), ValueError,
         r"prev_tokens must hold token ids in \[0, 10\)"),
        (dict(logits=x, prev_tokens=torch.tensor([[1], [-1]])), ValueError, "prev_tokens must hold token ids"),
        (dict(logits=x, prev_tokens=torch.tensor([[1], [2]], dtype=torch.int32)), TypeError,
         "prev_tokens must have dtype"),
        (dict(logits=x, prev_tokens=torch.tensor([1, 2])), ValueError, "prev_tokens must be 2-D"),
        (dict(logits=x, prev_tokens=torch.tensor([[1, 2]])), ValueError, r"prev_tokens must have shape \(2, L\)"),
        (dict(logits=x, validate=1), TypeError, "validate must be a bool"),
        (dict(logits=x, top_k=2**70), ValueError, "top_k must fit in int64"),
        (dict(logits=x, top_k=-(2**63) - 1), ValueError, "top_k must fit in int64"),
        (dict(logits=x.to("meta")), ValueError, "logits is on the meta device"),
        (dict(logits=x.to("meta"), validate=False), ValueError, "logits is on the meta device"),
        (dict(logits=x, temperature=1e300), ValueError, "temperature must be finite"),
        (dict(logits=x, temperature=torch.tensor([1.0, float("inf")])), ValueError, "temperature must be finite"),
        (dict(logits=x, min_p=torch.tensor([0.5, float("nan")])), ValueError, "min_p must be in"),
        (dict(logits=x, top_k=torch.tensor([3, -2])), ValueError, r"top_k must be >= 0 \(row 1\)"),
        (dict(logits=x, repetition_penalty=torch.tensor([1.0, -1.0])), ValueError,
         "repetition_penalty must be finite and > 0"),
        (dict(logits=x, repetition_penalty=float("inf")), ValueError, "repetition_penalty must be finite and > 0"),
        (dict(logits=nan.half()), ValueError, r"logits must not contain NaN \(row 1\)"),
        (dict(logits=neg_inf.bfloat16(), top_k=3), ValueError, r"a row is all -inf\) \(row 0\)"),
    ]


@pytest.mark.parametrize("kwargs,error,match", _bad_cases())
@pytest.mark.parametrize("fn", [filter_logits, sample_tokens, filter_logits_ref])
def test_bad_input(fn, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(**kwargs)


def test_bad_noise_and_generator():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="noise has shape"):
        sample_tokens(x, noise=torch.rand(2, 9))
    with pytest.raises(ValueError, match="pass noise or generator, not both"):
        sample_tokens(x, noise=torch.rand(2, 10), generator=torch.Generator())
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sample_tokens(x, generator=3)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator is on"):
            sample_tokens(x, generator=torch.Generator("cuda"))


@pytest.mark.parametrize("device,backend", backend_params("sample_tokens"))
def test_validate_false_is_memory_safe(device, backend):
    x = _logits(3, 50, device=device)
    x[1, 7] = float("nan")
    x[2] = float("-inf")
    prev = torch.tensor([[-5, 3, 50], [2**40, 1, 1], [0, 0, 49]], device=device)  # out of range: ignored
    kw = dict(top_k=torch.tensor([-3, 5, 2], device=device),
              top_p=torch.tensor([2.0, -1.0, float("nan")], device=device),
              min_p=torch.tensor([5.0, float("nan"), -1.0], device=device), repetition_penalty=1.5, prev_tokens=prev,
              validate=False)
    with genfast.backend(backend):
        tokens = sample_tokens(x, generator=torch.Generator(device).manual_seed(0), **kw)
        filtered = filter_logits(x, **kw)
    assert ((tokens >= 0) & (tokens < 50)).all()
    assert filtered.shape == (3, 50)
    # Row 0 is valid apart from its knobs: min_p > 1 keeps the max only, out-of-range ids are ignored.
    assert_same_filter(filtered[:1], filter_logits_ref(x[:1], **{**kw, "top_k": kw["top_k"][:1],
                                                                   "top_p": kw["top_p"][:1], "min_p": kw["min_p"][:1],
                                                                   "prev_tokens": prev[:1]}))


def test_repetition_penalty_once_per_token_and_deterministic():
    x = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    prev = torch.tensor([[0, 1, 0, 0, 1, 3, 3]])
    out = filter_logits_ref(x, repetition_penalty=2.0, prev_tokens=prev)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.25]]
    for _ in range(3):
        assert torch.equal(filter_logits(x, repetition_penalty=2.0, prev_tokens=prev), out)


# ---------------------------------------------------------------------------- registration
def _op_args(device):
    x = _logits(2, 40, device=device)
    knobs = (torch.tensor([0.8, 0.0], device=device), torch.tensor([5, 0], device=device),
             torch.tensor([0.9, 1.0], device=device), torch.tensor([0.01, 0.0], device=device))
    return x, knobs


@pytest.mark.parametrize("device,backend", backend_params("sample_tokens"))
def test_opcheck(device, backend):
    suffix = "_triton" if backend == "triton" else ""
    x, knobs = _op_args(device)
    filt = getattr(torch.ops.genfast, "filter_logits" + suffix)
    samp = getattr(torch.ops.genfast, "sample_tokens" + suffix)
    torch.library.opcheck(filt, (x, *knobs))
    torch.library.opcheck(samp, (x, *knobs, torch.rand(2, 40, device=device), None))
    torch.library.opcheck(samp, (x, *knobs, None, torch.tensor([5], device=device)))


@pytest.mark.parametrize("device,backend", backend_params("sample_tokens"))
def test_torch_compile_fullgraph(device, backend):
    x = _logits(2, 40, device=device)
    noise = torch.rand(2, 40, device=device)

    def step(logits, noise):
        kept = filter_logits(logits, top_k=5, top_p=0.9, temperature=0.8)
        return sample_tokens(logits, top_k=5, top_p=0.9, temperature=0.8, noise=noise), torch.isfinite(kept).sum(-1)

    def draw(logits):
        return sample_tokens(logits, top_k=5, generator=None)

    with genfast.backend(backend):
        tokens, kept = torch.compile(step, fullgraph=True)(x, noise)
        eager = step(x, noise)
        drawn = torch.compile(draw, fullgraph=True)(x)
    assert torch.equal(tokens, eager[0]) and torch.equal(kept, eager[1])
    assert ((drawn >= 0) & (drawn < 40)).all()


@pytest.mark.parametrize("device,backend", backend_params("filter_logits"))
def test_min_p_boundary_is_exact(device, backend):
    # min-p keeps token i iff double(y_i - y_max) >= log(min_p) in fp64: check both floats around the boundary.
    boundary = torch.tensor(math.log(0.25), dtype=torch.float32)
    below = torch.nextafter(boundary, torch.tensor(-10.0))
    above = torch.nextafter(boundary, torch.tensor(0.0))
    x = torch.stack([torch.tensor(0.0), below, boundary, above])[None].to(device)
    expected = [True, False, float(boundary) >= math.log(0.25), True]
    with genfast.backend(backend):
        got = filter_logits(x, min_p=0.25)
    assert (~torch.isinf(got)).tolist()[0] == expected
    assert (~torch.isinf(filter_logits_ref(x, min_p=0.25))).tolist()[0] == expected
