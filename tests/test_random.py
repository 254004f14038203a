"""The shared Philox stream: every backend draws exactly the numbers genfast/_philox.py specifies."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import genfast
from genfast import _philox
from genfast.ops import philox_noise, philox_noise_ref
from tests.conftest import backend_params, serving_backends


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


@pytest.mark.parametrize("seed", [0, 2**62 + 12345])
def test_normal_layout_four_per_call(seed):
    # Element 4c + lane is one output of the two Box-Muller transforms of call c's words, recomputed
    # here in float64 from the raw words: lanes (r1 cos t1, r1 sin t1, r2 cos t2, r2 sin t2).
    counters = np.array([0, 1, 7, 2**30 + 3, 2**32 - 1, 2**32, 2**40 + 9], dtype=np.uint64)
    words = _philox.philox4x32_10(seed, counters)
    x, y, z, w = (((word >> np.uint64(8)).astype(np.float64) + 0.5) / 2**24 for word in words)
    r1, t1 = np.sqrt(-2 * np.log(x)), 2 * np.pi * y
    r2, t2 = np.sqrt(-2 * np.log(z)), 2 * np.pi * w
    expected = np.stack([r1 * np.cos(t1), r1 * np.sin(t1), r2 * np.cos(t2), r2 * np.sin(t2)], axis=-1)
    elements = (4 * counters[:, None] + np.arange(4, dtype=np.uint64)).reshape(-1)
    got = _philox.normal(seed, elements).reshape(-1, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got, _philox.normal4(seed, counters))
    # The C++ stream at the same elements (through philox_noise, one call per four).
    for row, counter in enumerate(counters):
        drawn = philox_noise(seed, 4, offset=int(4 * counter), normal=True).numpy()
        np.testing.assert_allclose(drawn, expected[row], rtol=1e-5, atol=1e-5)
    # The uniform stream is untouched: element i is word x of call i (exact in float32).
    np.testing.assert_array_equal(_philox.uniform(seed, counters), x.astype(np.float32))


def test_normal_lanes_standard_and_independent():
    calls = 200_000
    lanes = _philox.normal(3, np.arange(4 * calls, dtype=np.uint64)).astype(np.float64).reshape(calls, 4)
    for lane in range(4):  # each lane alone is N(0, 1): mean and variance within 5 standard errors
        assert abs(lanes[:, lane].mean()) < 5 / np.sqrt(calls)
        assert abs(lanes[:, lane].var() - 1) < 5 * np.sqrt(2 / calls)
    # Uncorrelated within a call (the cos/sin pair of one transform, and across the two transforms)
    # and across neighbouring calls: |correlation| within 5 standard errors (1/sqrt(n)) of 0.
    pairs = [(lanes[:, 0], lanes[:, 1]), (lanes[:, 2], lanes[:, 3]), (lanes[:, 0], lanes[:, 2]),
             (lanes[:, 1], lanes[:, 3]), (lanes[:-1, 3], lanes[1:, 0])]
    for a, b in pairs:
        assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(len(a))
    # The cos/sin pair is independent, not merely uncorrelated: a^2 and b^2 are uncorrelated too
    # (a radius shared without independence would correlate them).
    assert abs(np.corrcoef(lanes[:, 0] ** 2, lanes[:, 1] ** 2)[0, 1]) < 5 / np.sqrt(calls)


def _cpu_step_normals_match_specification(sizes) -> None:
    # With every coefficient 0 but SIGMA (the last) = 1, scheduler_step returns the normals it drew.
    for numel in sizes:
        coefs = torch.zeros(11)
        coefs[-1] = 1.0
        x = torch.zeros(numel)
        seed = torch.tensor([2**40 + 17])
        got = torch.ops.genfast.scheduler_step(x, x, None, 1.0, coefs, None, seed)
        torch.testing.assert_close(got, philox_noise_ref(seed, numel, 0, True), rtol=2e-6, atol=2e-6)
    # philox_noise draws through the same SIMD code (csrc/cpu/philox_simd.h), from odd offsets too; its threads
    # split the range at any element (the partial groups at a split take the scalar path: ulp-level differences).
    for numel, offset in zip(sizes, (0, 3, 2**33 + 5)):
        seed = torch.tensor([2**40 + 17])
        got = torch.ops.genfast.philox_noise(seed, numel, offset, True)
        torch.testing.assert_close(got, philox_noise_ref(seed, numel, offset, True), rtol=2e-6, atol=2e-6)


# scheduler_step's CPU kernel draws its normals 64 (AVX-512) or 32 (AVX2) at a time; its threads
# and chunks may start at any element, so sizes that split at odd elements test the partial calls
# at both ends. (The 64-bit counter straddling 2^32 inside a SIMD block is not reachable this way.)
_SIMD_SIZES = [65542, 65545, 100_003]
_needs_cpu_kernels = pytest.mark.skipif(
    "cpu" not in serving_backends("scheduler_step", "cpu"), reason="genfast._C not built"
)


@_needs_cpu_kernels
def test_cpu_simd_normals_match_specification():
    _cpu_step_normals_match_specification(_SIMD_SIZES)


@_needs_cpu_kernels
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_cpu_narrower_normals_match_specification(capability):
    # The kernel picks its path once per process, honouring torch's ATEN_CPU_CAPABILITY: a fresh
    # interpreter with it lowered runs the AVX2 and the scalar paths on a CPU that has AVX-512.
    script = f"import tests.test_random as t; t._cpu_step_normals_match_specification({_SIMD_SIZES})"
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


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


@pytest.mark.parametrize("backend", ["auto", "reference"] + serving_backends("philox_noise", "cpu"))
@pytest.mark.parametrize("offset,numel", [(2**63 - 1, 4), (2**63 - 3, 4), (2**63 - 1, 1)])
def test_offset_past_the_end_of_the_stream_is_refused(backend, offset, numel):
    # The stream is indexed by int64: C++ and Triton used to wrap offset + i silently to the first elements.
    with genfast.backend(backend), pytest.raises(ValueError, match="offset \\+ numel"):
        philox_noise(1, numel, offset=offset)


def test_last_elements_of_the_stream_are_served():
    for backend in ["auto", "reference"] + serving_backends("philox_noise", "cpu"):
        with genfast.backend(backend):
            got = philox_noise(1, 3, offset=2**63 - 4)
        assert torch.equal(got, philox_noise_ref(torch.tensor([1]), 3, 2**63 - 4)), backend


@pytest.mark.parametrize("op", ["philox_noise", "philox_noise_triton"])
def test_custom_ops_called_directly_refuse_a_wrapping_offset(op):
    if op == "philox_noise" and not hasattr(torch.ops.genfast, "philox_noise"):
        pytest.skip("the compiled extension is not loaded")
    with pytest.raises((RuntimeError, ValueError), match="offset \\+ numel"):
        getattr(torch.ops.genfast, op)(torch.tensor([1]), 4, 2**63 - 2, False)


def test_numel_larger_than_memory_names_the_argument():
    with pytest.raises(ValueError, match="philox_noise: numel=1099511627776 needs 4096.0 GiB"):
        philox_noise(1, 2**40)
