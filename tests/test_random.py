"""The shared Philox stream: every backend draws exactly the numbers genfast/_philox.py specifies."""

import numpy as np
import pytest
import torch

import genfast
from genfast import _philox
from genfast.ops import philox_noise, philox_noise_ref
from tests.conftest import backend_params


@pytest.mark.parametrize("device,backend", backend_params("philox_noise"))
@pytest.mark.parametrize("normal", [False, True])
@pytest.mark.parametrize("seed,numel,offset", [(0, 1, 0), (2**62 + 12345, 1000, 0), (77, 333, 2**33 + 5)])
def test_backend_matches_specification(device, backend, normal, seed, numel, offset):
    with genfast.backend(backend):
        got = philox_noise(torch.tensor([seed], device=device), numel, offset=offset, normal=normal)
    expected = philox_noise_ref(torch.tensor([seed]), numel, offset, normal)
    if normal:
        # sqrt/log/cos may differ by an ulp between libm, CUDA and NumPy; the bits drawn may not.
        torch.testing.assert_close(got.cpu(), expected, rtol=2e-6, atol=2e-6)
    else:
        assert torch.equal(got.cpu(), expected)


def test_uniform_is_open_interval_and_uniform():
    u = _philox.uniform(5, np.arange(200_000, dtype=np.uint64))
    assert u.min() > 0 and u.max() < 1
    counts, _ = np.histogram(u, bins=20, range=(0, 1))
    expected = len(u) / 20
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_normal_moments():
    n = _philox.normal(9, np.arange(200_000, dtype=np.uint64)).astype(np.float64)
    assert abs(n.mean()) < 5 / np.sqrt(len(n))
    assert abs(n.var() - 1) < 5 * np.sqrt(2 / len(n))


def test_streams_differ_by_seed_and_offset():
    a = philox_noise(1, 64)
    assert not torch.equal(a, philox_noise(2, 64))
    assert torch.equal(a[8:], philox_noise(1, 56, offset=8))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(seed=-1, numel=4), ValueError, "seed must be in"),
        (dict(seed=1.5, numel=4), TypeError, "seed must be an int"),
        (dict(seed=torch.tensor([1.0]), numel=4), ValueError, "seed must hold one int64"),
        (dict(seed=1, numel=-3), ValueError, "numel must be"),
        (dict(seed=1, numel=3, offset=-1), ValueError, "offset must be"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        philox_noise(**kwargs)


@pytest.mark.parametrize("device,backend", backend_params("philox_noise"))
def test_opcheck_and_compile(device, backend):
    seed = torch.tensor([11], device=device)
    op = torch.ops.genfast.philox_noise_triton if backend == "triton" else torch.ops.genfast.philox_noise
    torch.library.opcheck(op, (seed, 16, 3, True))
    with genfast.backend(backend):
        compiled = torch.compile(lambda s: philox_noise(s, 16, offset=3, normal=True) + 1, fullgraph=True)
        torch.testing.assert_close(compiled(seed), philox_noise(seed, 16, offset=3, normal=True) + 1)
