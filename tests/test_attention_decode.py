"""genfast.ops.attention_decode and kv_cache_append against the spec (attention_ref on each cache prefix).

Rule (CONTRIBUTING.md, section 3): ``err(backend) <= 2 * err(torch) + FLOOR[dtype]``, err measured against the spec run
in fp64 on the same rounded inputs, err(torch) being the spec run in the low dtype itself. The CPU reference
path (masked SDPA over the whole cache) is held to the same rule, since it is what auto runs on CPU.
Shapes stay tiny: the Triton kernels run in the interpreter here (BLOCK_N = 16, so 100 keys cross 7 tiles).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import genfast
from genfast.ops import attention, attention_decode, attention_decode_ref, kv_cache_append, kv_cache_append_ref
from tests.conftest import backend_params
from tests.tolerance import assert_within_tolerance, max_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
PARAMS = backend_params("attention_decode") + [pytest.param("cpu", "reference", id="cpu-reference")]
APPEND_PARAMS = backend_params("kv_cache_append") + [pytest.param("cpu", "reference", id="cpu-reference")]


def _make(b, hq, hk, nq, nmax, d, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hk, nmax, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hk, nmax, d, generator=gen, dtype=torch.float64).to(dtype)
    return [t.to(device) for t in (q, k, v)]


def _check(backend, q, k, v, lengths, **kwargs):
    dtype = q.dtype
    with genfast.backend(backend):
        got = attention_decode(q, k, v, lengths, return_lse=True, **kwargs)
        out_only = attention_decode(q, k, v, lengths, **kwargs)  # the reference path differs without lse
    spec_kwargs = {key: val for key, val in kwargs.items() if key != "num_splits"}
    exact = attention_decode_ref(q.double(), k.double(), v.double(), lengths, return_lse=True, **spec_kwargs)
    low = attention_decode_ref(q, k, v, lengths, return_lse=True, compute_dtype=dtype, **spec_kwargs)
    for name, g, e, t in (("out", got[0], exact[0], low[0]), ("lse", got[1], exact[1], low[1]),
                          ("out (no lse)", out_only, exact[0], low[0])):
        assert g.dtype == (torch.float32 if name == "lse" else dtype) and g.shape == e.shape, name
        floor = FLOOR[dtype] + torch.finfo(dtype).eps * e[torch.isfinite(e)].abs().max().item()
        ours, theirs = max_error(g, e), max_error(t, e)
        assert_within_tolerance(name, ours, theirs, floor)


# (B, Hq, Hk, Nq, Nmax, D, lengths, options)
CASES = {
    "one-token-odd-lengths": (3, 2, 2, 1, 100, 16, [1, 17, 100], {}),
    "gqa-4-new-causal": (3, 4, 2, 4, 100, 32, [4, 17, 100], {}),
    "mqa-3-new-noncausal": (2, 4, 1, 3, 37, 16, [3, 37], {"causal": False}),
    "window-left": (2, 2, 1, 2, 64, 16, [2, 60], {"window": (9, None)}),
    "window-both-noncausal": (2, 2, 2, 5, 50, 16, [7, 50], {"window": (4, 2), "causal": False}),
    "d80-scale-16-new": (2, 2, 1, 16, 40, 80, [16, 33], {"scale": 0.2}),
    "odd-d97-n97": (3, 3, 1, 1, 97, 97, [1, 17, 97], {}),
}


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_spec(device, backend, dtype, case):
    b, hq, hk, nq, nmax, d, lengths, options = CASES[case]
    q, k, v = _make(b, hq, hk, nq, nmax, d, dtype, device)
    _check(backend, q, k, v, torch.tensor(lengths, dtype=torch.int32, device=device), **options)


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_splits(device, backend, num_splits):
    """Every split count gives the spec's answer (8 splits of 100 keys leaves some splits empty for short rows)."""
    q, k, v = _make(3, 4, 2, 2, 100, 16, torch.float32, device, seed=1)
    lengths = torch.tensor([2, 45, 100], dtype=torch.int64, device=device)
    _check(backend, q, k, v, lengths, num_splits=num_splits)
    with genfast.backend(backend):
        one = attention_decode(q, k, v, lengths, num_splits=1)
        many = attention_decode(q, k, v, lengths, num_splits=num_splits)
    torch.testing.assert_close(many, one, atol=2e-6, rtol=0)


@pytest.mark.parametrize("device,backend", APPEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_append_then_decode_equals_attention(device, backend, dtype):
    """Prefill k/v, append Nq new tokens, decode: equals causal attention over the concatenation, per sequence."""
    b, hq, hk, nmax, d, nq = 2, 4, 2, 48, 16, 3
    prefix = [5, 30]
    gen = torch.Generator().manual_seed(3)
    full_k = [torch.randn(1, hk, n + nq, d, generator=gen).to(dtype) for n in prefix]
    full_v = [torch.randn(1, hk, n + nq, d, generator=gen).to(dtype) for n in prefix]
    q = torch.randn(b, hq, nq, d, generator=gen).to(dtype).to(device)
    k_cache = torch.full((b, hk, nmax, d), float("nan"), dtype=dtype)  # unwritten slots must never be read
    v_cache = torch.full((b, hk, nmax, d), float("nan"), dtype=dtype)
    for i, n in enumerate(prefix):
        k_cache[i, :, :n], v_cache[i, :, :n] = full_k[i][0, :, :n], full_v[i][0, :, :n]
    k_cache, v_cache = k_cache.to(device), v_cache.to(device)
    k_new = torch.stack([t[0, :, -nq:] for t in full_k]).to(device)
    v_new = torch.stack([t[0, :, -nq:] for t in full_v]).to(device)
    lengths = torch.tensor(prefix, dtype=torch.int32, device=device)
    with genfast.backend(backend):
        kv_cache_append(k_cache, v_cache, k_new, v_new, lengths)
    for i, n in enumerate(prefix):
        assert torch.equal(k_cache[i, :, :n + nq].cpu(), full_k[i][0]) and torch.equal(v_cache[i, :, :n + nq].cpu(),
                                                                                         full_v[i][0])
        assert torch.isnan(k_cache[i, :, n + nq:]).all()
    with genfast.backend("triton" if backend == "triton" else "reference"):
        out = attention_decode(q, k_cache, v_cache, lengths + nq)
    for i in range(b):
        want = attention(q[i:i + 1].float().cpu(), full_k[i].float(), full_v[i].float(), causal=True)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[i:i + 1].float().cpu(), want, atol=tol, rtol=0)


@pytest.mark.parametrize("device,backend", APPEND_PARAMS)
def test_append_overflow(device, backend):
    k_cache, v_cache = torch.zeros(2, 1, 8, 16, device=device), torch.zeros(2, 1, 8, 16, device=device)
    new = torch.ones(2, 1, 3, 16, device=device)
    lengths = torch.tensor([2, 6], device=device)
    with genfast.backend(backend):
        with pytest.raises(ValueError, match=r"cache_seqlens must be in \[0, 5\]"):
            kv_cache_append(k_cache, v_cache, new, new, lengths)
        assert not k_cache.any()  # nothing written before the error
        # validate=False: memory-safe, the tokens past Nmax are dropped, the others written.
        kv_cache_append(k_cache, v_cache, new, 2 * new, lengths, validate=False)
    assert k_cache[0, :, 2:5].eq(1).all() and k_cache[1, :, 6:8].eq(1).all() and v_cache[1, :, 6:8].eq(2).all()
    assert k_cache.sum().item() == (3 + 2) * 16


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("d", [64, 40])
def test_long_cache_splits_and_nan(device, backend, d):
    """One sequence and one kv head over a long cache (the CPU kernel splits its keys across threads and merges
    the splits): matches the spec; a NaN in one visible key makes its group's rows NaN, and a NaN query row NaN."""
    q, k, v = _make(1, 4, 1, 2, 3000, d, torch.float32, device, seed=5)
    lengths = torch.tensor([2900], device=device)
    _check(backend, q, k, v, lengths)
    k[0, 0, 1234, 3] = float("nan")
    q2, _, _ = _make(2, 4, 2, 1, 3000, d, torch.float32, device, seed=6)
    k2, v2 = torch.cat([k, k.clone().fill_(0.5)], 1).expand(2, 2, 3000, d), torch.cat([v, v], 1).expand(2, 2, 3000, d)
    q2[1, 3, 0, 0] = float("nan")
    with genfast.backend(backend):
        out = attention_decode(q2, k2, v2, torch.tensor([2900, 2900], device=device))
    assert out[:, :2].isnan().all() and not out[0, 2:].isnan().any()  # kv head 0 holds the NaN key
    assert out[1, 3].isnan().all() and not out[1, 2].isnan().any()  # the NaN query row alone



@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_infinite_query_entry_gives_the_specs_rows(device, backend, dtype):
    """A -inf in a query row whose keys are all positive there makes every visible score -inf: the row has no key
    to attend to and comes out 0, as in the specification (torch's SDPA gives NaN there, which the reference
    backend's fast path once returned); +inf makes every score +inf, which is NaN in the specification too."""
    q, k, v = _make(2, 2, 1, 3, 20, 8, dtype, device, seed=3)
    k[..., 5] = k[..., 5].abs() + 0.5
    q[0, 1, 0, 5] = float("-inf")
    q[1, 0, 2, 5] = float("inf")
    lengths = torch.tensor([9, 20], device=device)
    with genfast.backend(backend):
        out = attention_decode(q, k, v, lengths, causal=False)
        lse = attention_decode(q, k, v, lengths, causal=False, return_lse=True)[1]
    spec = attention_decode_ref(q, k, v, lengths, causal=False)
    assert (out[0, 1, 0] == 0).all() and lse[0, 1, 0] == float("-inf")
    assert out[1, 0, 2].isnan().all()
    torch.testing.assert_close(out, spec, atol=FLOOR[dtype] * 20, rtol=1e-3, equal_nan=True)

def _cpu_kernel_matches_spec() -> None:
    """The CPU kernel on head dims with their own path (64, 128) and any other (40), GQA, Nq > 1, bf16."""
    for d, dtype in ((64, torch.float32), (128, torch.float32), (40, torch.float32), (64, torch.bfloat16)):
        q, k, v = _make(2, 4, 2, 3, 300, d, dtype, "cpu", seed=d)
        _check("cpu", q, k, v, torch.tensor([300, 77]))


@pytest.mark.skipif("cpu" not in [p.values[1] for p in PARAMS], reason="genfast._C not built")
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_cpu_kernel_narrower_paths(capability):
    """The kernel picks AVX2 or its scalar loop once per process from torch's ATEN_CPU_CAPABILITY: a fresh
    interpreter with it lowered runs the path this one does not."""
    script = "import tests.test_attention_decode as t; t._cpu_kernel_matches_spec()"
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("device,backend", APPEND_PARAMS + [pytest.param("cpu", "auto", id="cpu-auto")])
def test_append_unvalidated_negative_length_agrees_with_reference(device, backend):
    """validate=False with a negative length: token t goes to slot L + t when that is in [0, Nmax), else it is
    dropped, on every backend (the CPU kernel once clamped L to 0 and wrote slots 0, 1, 2 instead of slot 0)."""
    k_cache, v_cache = torch.zeros(2, 2, 8, 4, device=device), torch.zeros(2, 2, 8, 4, device=device)
    new = torch.arange(1, 3 * 4 + 1, dtype=torch.float32, device=device).reshape(1, 1, 3, 4).expand(2, 2, 3, 4)
    lengths = torch.tensor([-2, -7], device=device)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    kv_cache_append_ref(want_k, want_v, new, -new, lengths)
    with genfast.backend(backend):
        kv_cache_append(k_cache, v_cache, new, -new, lengths, validate=False)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)
    assert torch.equal(k_cache[0, :, 0], new[0, :, 2]) and not k_cache[0, :, 1:].any() and not k_cache[1].any()


@pytest.mark.parametrize("device,backend", PARAMS)
def test_unvalidated_lengths_are_clamped(device, backend):
    """validate=False with lengths outside [Nq, Nmax]: no out-of-bounds read; as if clamped to [0, Nmax]."""
    q, k, v = _make(3, 2, 1, 2, 20, 16, torch.float32, device, seed=4)
    bad = torch.tensor([-5, 1, 1000], device=device)
    with genfast.backend(backend):
        out, lse = attention_decode(q, k, v, bad, return_lse=True, validate=False)
        with pytest.raises(ValueError, match=r"cache_seqlens must be in \[2, 20\]"):
            attention_decode(q, k, v, bad)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))  # length 0: no key at all
    assert torch.all(lse[1, :, 0] == float("-inf")) and torch.isfinite(lse[1, :, 1]).all()  # token 0 at position -1
    want = attention_decode_ref(q[2:], k[2:], v[2:], torch.tensor([20]), return_lse=True)
    torch.testing.assert_close(out[2:], want[0], atol=1e-6, rtol=0)


def _bad_cases():
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 8, 16)
    lengths = torch.tensor([3, 8], dtype=torch.int32)
    return [
        ((q, k, torch.randn(2, 2, 9, 16), lengths), {}, ValueError, "v_cache has shape"),
        ((q, torch.randn(2, 2, 8, 32), torch.randn(2, 2, 8, 32), lengths), {}, ValueError, "head dims differ"),
        ((q, torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16), lengths), {}, ValueError, "multiple of the cache"),
        ((torch.randn(2, 4, 17, 16), k, k, torch.tensor([17, 17])), {}, ValueError, "1 to 16 new tokens"),
        ((q, k, k, lengths.float()), {}, TypeError, "cache_seqlens must have dtype"),
        ((q, k, k, lengths[:1]), {}, ValueError, "one length per sequence"),
        ((q, k, k, lengths[None]), {}, ValueError, "cache_seqlens must be 1-D"),
        ((q, k, k, torch.tensor([0, 3])), {}, ValueError, r"cache_seqlens must be in \[1, 8\]"),
        ((q, k, k, torch.tensor([3, 9])), {}, ValueError, r"cache_seqlens must be in \[1, 8\]"),
        ((q.half(), k, k, lengths), {}, TypeError, "k_cache has dtype"),
        ((q, k, k, lengths), {"num_splits": 0}, ValueError, "num_splits must be"),
        ((q, k, k, lengths), {"window": (1, -3)}, ValueError, r"window\[1\]"),
        ((q, k, k, lengths), {"causal": None}, TypeError, "causal must be a bool"),
        ((q, k, k, lengths), {"validate": 1}, TypeError, "validate must be a bool"),
        ((q, torch.randn(3, 2, 8, 16), torch.randn(3, 2, 8, 16), lengths), {}, ValueError, "k_cache has batch"),
        ((q.clone().requires_grad_(), k, k, lengths), {}, ValueError, "inference only"),
    ]


@pytest.mark.parametrize("args,kwargs,error,match", _bad_cases())
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        attention_decode(*args, **kwargs)


def test_append_bad_input():
    cache, new, lengths = torch.zeros(2, 2, 8, 16), torch.zeros(2, 2, 3, 16), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="k_new has 1 heads"):
        kv_cache_append(cache, cache.clone(), new[:, :1], new[:, :1], lengths)
    with pytest.raises(TypeError, match="v_cache has dtype"):
        kv_cache_append(cache, cache.half(), new, new, lengths)
    with pytest.raises(ValueError, match=r"cache_seqlens must be in \[0, 5\]"):
        kv_cache_append(cache, cache.clone(), new, new, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="v_new has shape"):
        kv_cache_append(cache, cache.clone(), new, new[:, :, :2], lengths)


# ------------------------------------------------------------------------------------------ opcheck, compile
@pytest.mark.parametrize("device,backend", backend_params("attention_decode"))
def test_opcheck(device, backend):
    q, k, v = _make(2, 4, 2, 3, 20, 16, torch.float32, device, seed=5)
    lengths = torch.tensor([3, 20], dtype=torch.int32, device=device)
    op = torch.ops.genfast.attention_decode if backend in ("cuda", "cpu") else torch.ops.genfast.attention_decode_triton
    torch.library.opcheck(op, (q, k, v, lengths, True, 0.25, 4, 0, 2))  # bounds resolved: causal is right = 0
    appends = [torch.ops.genfast.kv_cache_append_triton, torch.ops.genfast.kv_cache_append_torch]
    if backend == "cpu":
        appends.append(torch.ops.genfast.kv_cache_append)
    for op in appends:
        torch.library.opcheck(op, (k.clone(), v.clone(), q[:, :2], q[:, 2:], lengths - 3))


@pytest.mark.parametrize("device,backend", PARAMS)
def test_compile_fullgraph(device, backend):
    q, k, v = _make(2, 4, 2, 2, 20, 16, torch.float32, device, seed=6)
    lengths = torch.tensor([3, 18], dtype=torch.int32, device=device)
    k_new, v_new = q[:, :2].clone(), q[:, 2:].clone()

    def step(q, k_cache, v_cache, lengths):
        kv_cache_append(k_cache, v_cache, k_new, v_new, lengths)
        out, lse = attention_decode(q, k_cache, v_cache, lengths + 2, return_lse=True)
        return out * 2 + lse[..., None]

    with genfast.backend(backend):
        k1, v1, k2, v2 = k.clone(), v.clone(), k.clone(), v.clone()
        got = torch.compile(step, fullgraph=True)(q, k1, v1, lengths)
        want = step(q, k2, v2, lengths)
    torch.testing.assert_close(got, want)
    assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_append_ref_matches_slots():
    cache = torch.zeros(2, 1, 6, 2)
    new = torch.arange(8.0).reshape(2, 1, 2, 2)
    kv_cache_append_ref(cache, cache, new, new, torch.tensor([1, 4]))
    assert torch.equal(cache[0, 0, 1:3], new[0, 0]) and torch.equal(cache[1, 0, 4:6], new[1, 0])
    assert cache[0, 0, [0, 3, 4, 5]].eq(0).all() and cache[1, 0, :4].eq(0).all()


@pytest.mark.parametrize("device,backend", APPEND_PARAMS)
def test_append_refuses_caches_that_share_memory(device, backend):
    """Issue 18 #1: an expanded cache (rows share memory) or k_cache aliasing v_cache would take writes meant for
    another slot; every backend refuses them before writing."""
    new = torch.ones(2, 1, 1, 4, device=device)
    lengths = torch.tensor([0, 1], device=device)
    shared_rows = torch.zeros(1, 1, 8, 4, device=device).expand(2, 1, 8, 4)
    own = torch.zeros(2, 1, 8, 4, device=device)
    flat = torch.zeros(2 * 8 * 4 + 8, device=device)  # two views of it, 8 elements apart, overlap
    cases = [(shared_rows, own, "k_cache has elements that share memory"),
             (own, shared_rows, "v_cache has elements that share memory"),
             (own, own, "k_cache and v_cache overlap"),
             (flat[:64].view(2, 1, 8, 4), flat[8:].view(2, 1, 8, 4), "k_cache and v_cache overlap")]
    with genfast.backend(backend):
        for k_cache, v_cache, match in cases:
            with pytest.raises(ValueError, match=match):
                kv_cache_append(k_cache, v_cache, new, new, lengths)
        assert not own.any() and not shared_rows.any() and not flat.any()
        # Disjoint halves of one buffer are two caches, not an alias.
        both = torch.zeros(2, 2, 1, 8, 4, device=device)
        kv_cache_append(both[0], both[1], new, 2 * new, lengths)
    assert both[0, 0, 0, 0].eq(1).all() and both[1, 1, 0, 1].eq(2).all() and both.sum() == 2 * 4 * 3


@pytest.mark.parametrize("device,backend", PARAMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unwritten_slots_are_never_read(device, backend, dtype):
    """NaN past each sequence's length (torch.empty caches) leaves the answer unchanged."""
    q, k, v = _make(3, 4, 2, 2, 33, 16, dtype, device, seed=7)
    lengths = torch.tensor([2, 17, 33], device=device)
    k_nan, v_nan = k.clone(), v.clone()
    for i, n in enumerate(lengths.tolist()):
        k_nan[i, :, n:], v_nan[i, :, n:] = float("nan"), float("nan")
    with genfast.backend(backend):
        want = attention_decode(q, k, v, lengths)
        got = attention_decode(q, k_nan, v_nan, lengths)
    assert torch.equal(got, want)


@pytest.mark.skipif(not genfast._ext.loaded, reason="needs the compiled extension")
def test_cpu_kernels_guard_direct_calls():
    """torch.ops.genfast.* called directly (no Python checks) still refuses aliasing and bad shapes."""
    cache = torch.zeros(2, 1, 8, 4)
    new, lengths = torch.ones(2, 1, 1, 4), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="overlap|same memory"):
        torch.ops.genfast.kv_cache_append(cache, cache, new, new, lengths)
    with pytest.raises(RuntimeError, match="overlap|single memory location"):
        torch.ops.genfast.kv_cache_append(cache[:1].expand(2, 1, 8, 4), cache[1:].clone().expand(2, 1, 8, 4), new,
                                          new, lengths)
    with pytest.raises(RuntimeError, match="Hk must divide Hq"):
        torch.ops.genfast.attention_decode(torch.zeros(2, 3, 1, 4), torch.zeros(2, 2, 8, 4), torch.zeros(2, 2, 8, 4),
                                           lengths, True, 0.5, -1, -1, 0)


@pytest.mark.parametrize("device,backend", PARAMS)
def test_empty_batch(device, backend):
    """B = 0: empty outputs, no error from the length checks (whose min/max of nothing used to raise)."""
    q, k, v = _make(0, 2, 1, 1, 8, 16, torch.float32, device)
    lengths = torch.zeros(0, dtype=torch.int64, device=device)
    with genfast.backend(backend):
        out, lse = attention_decode(q, k, v, lengths, return_lse=True)
        kv_cache_append(k, v, q[:, :1], q[:, 1:], lengths)
    assert out.shape == (0, 2, 1, 16) and lse.shape == (0, 2, 1)


# ------------------------------------------------------------------------------------------ tiles on a GPU
@pytest.mark.parametrize("elem", [2, 4])
@pytest.mark.parametrize("d", [16, 64, 80, 128, 256])
@pytest.mark.parametrize("rows", [1, 17, 32, 64, 256])
def test_split_tiles_rule_on_a_gpu(monkeypatch, elem, d, rows):
    """The compiled path's tile rule (what benchmarks/compile measured with ptxas): fp32 FMA dots keep
    16 rows, 8 warps and key tiles of 16 past d64; fp16/bf16 take 8 warps from 32 rows on; the
    third stage only where its shared memory fits the GPU's limit (sm_80's is the smallest gated)."""
    import triton

    from genfast.kernels import attention_decode as kernels

    monkeypatch.setattr(kernels, "_COMPILED", True)
    monkeypatch.setattr(kernels, "BLOCK_N", 64)
    monkeypatch.setattr(kernels, "MAX_BLOCK_M", 64)
    block_d = max(16, triton.next_power_of_2(d))
    for limit in (232448, 166912):
        block_m, block_n, warps, stages = kernels.split_tiles(rows, block_d, elem, limit)
        assert kernels.split_shared_bytes(block_m, block_n, block_d, stages, elem) <= limit
        assert 16 <= block_n <= 64 and stages in (2, 3)
        if elem == 4:
            assert (block_m, warps) == (16, 8) and block_n == (64 if block_d <= 64 else 16)
        else:
            assert block_m == max(16, min(64, triton.next_power_of_2(rows))) and block_n == 64
            assert warps == (4 if block_m == 16 else 8)
    # bf16 d256 with 64 rows: three stages fit Hopper (229,376 B measured), only two fit an A100.
    assert kernels.split_tiles(64, 256, 2, 232448)[3] == 3
    assert kernels.split_tiles(64, 256, 2, 166912)[3] == 2


def test_split_tiles_in_the_interpreter_are_small():
    from genfast.kernels import attention_decode as kernels

    assert kernels.split_tiles(64, 256, 4, 232448)[:2] == (16, 16)  # tests still cross several tiles
