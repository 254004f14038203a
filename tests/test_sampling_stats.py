"""Statistical tests of sample_tokens: 200k draws against the reference's filtered distribution."""

import pytest
import torch

import genfast
from genfast.ops import filter_logits_ref, sample_tokens
from tests.conftest import serving_backends

DRAWS = 200_000
LOGITS = torch.tensor([2.0, 1.5, 1.5, 1.0, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0, 0.8, -0.2])
CASES = {
    "plain": dict(),
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=0.7),
    "min_p": dict(min_p=0.2),
    "all": dict(temperature=0.6, top_k=8, top_p=0.9, min_p=0.05),
}


def within_bounds(counts: torch.Tensor, probs: torch.Tensor, n: int, sds: float = 5.0) -> bool:
    """Each token's count within ``sds`` binomial standard deviations of n p; removed tokens never drawn."""
    expected = n * probs
    sd = torch.sqrt(n * probs * (1 - probs))
    return bool(((counts - expected).abs() <= sds * sd).all() and (counts[probs == 0] == 0).all())


def _backends():
    return [b for b in ("cpu", "cuda") if b in serving_backends("sample_tokens", "cuda" if b == "cuda" else "cpu")]


@pytest.mark.parametrize("backend", _backends() or [pytest.param("cpu", marks=pytest.mark.skip("no C++ kernel"))])
@pytest.mark.parametrize("case", list(CASES))
def test_distribution_matches_reference(backend, case):
    device = "cuda" if backend == "cuda" else "cpu"
    kw = CASES[case]
    logits = LOGITS.to(device).expand(DRAWS, -1).contiguous()
    with genfast.backend(backend):
        tokens = sample_tokens(logits, generator=torch.Generator(device).manual_seed(1234), **kw)
    counts = torch.bincount(tokens.cpu(), minlength=len(LOGITS)).double()
    probs = torch.softmax(filter_logits_ref(LOGITS[None], **kw)[0].double(), -1)
    assert within_bounds(counts, probs, DRAWS), (counts.tolist(), (DRAWS * probs).tolist())


@pytest.mark.parametrize("backend", _backends() or [pytest.param("cpu", marks=pytest.mark.skip("no C++ kernel"))])
@pytest.mark.parametrize("streams", ["one request per row", "one request over many steps"])
def test_per_row_seeds_follow_the_distribution(backend, streams):
    # Per-row streams must still be uniform: DRAWS requests with consecutive seeds (what GPT.generate's seed=s
    # gives), or one request whose step advances every draw (offsets 0..DRAWS-1 under one seed).
    device = "cuda" if backend == "cuda" else "cpu"
    kw = CASES["all"]
    logits = LOGITS.to(device).expand(DRAWS, -1).contiguous()
    steps = torch.arange(DRAWS, device=device)
    if streams == "one request per row":
        seeds, offsets = steps + 1234, torch.zeros_like(steps)
    else:
        seeds, offsets = torch.full_like(steps, 1234), steps
    with genfast.backend(backend):
        tokens = sample_tokens(logits, seeds=seeds, offsets=offsets, **kw)
    counts = torch.bincount(tokens.cpu(), minlength=len(LOGITS)).double()
    probs = torch.softmax(filter_logits_ref(LOGITS[None], **kw)[0].double(), -1)
    assert within_bounds(counts, probs, DRAWS), (counts.tolist(), (DRAWS * probs).tolist())


def test_bound_detects_one_biased_token():
    # The bound has power: the same counts fail against a distribution with one token 3% (relative) off.
    probs = torch.softmax(LOGITS.double(), -1)
    counts = torch.bincount(torch.multinomial(probs, DRAWS, replacement=True,
                                              generator=torch.Generator().manual_seed(0)), minlength=len(LOGITS))
    assert within_bounds(counts.double(), probs, DRAWS)
    biased = probs.clone()
    biased[0] *= 1.03
    biased[1:] *= (1 - biased[0]) / biased[1:].sum()
    assert not within_bounds(counts.double(), biased, DRAWS)
