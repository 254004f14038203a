"""The Hopper attention paths, run by the Triton interpreter on CPU tensors and held to the spec.

On a GPU of capability 9.x, fp16/bf16 attention takes the TMA forward of genfast/kernels/attention_sm90.py and a
backward whose Q/dO tiles come through tensor descriptors; every backward adds dQ with atomics (five matmuls per
tile) unless deterministic algorithms are asked for. ``GENFAST_ATTENTION_TMA=1`` makes the interpreter take the
same kernels here, so they meet the rule of tests/test_attention.py (CONTRIBUTING.md section 3) on every case,
mask, dropout and the varlen layout, gradients included.
"""

import contextvars
import os

import pytest
import torch
import triton
from triton.runtime import _allocation

import genfast
from genfast.kernels import _attention_configs as configs
from genfast.kernels import attention as kernels
from genfast.kernels import attention_sm90
from genfast.ops import attention, attention_ref
from genfast.ops._attention_common import window_bounds
from tests import test_attention as dense
from tests import test_attention_varlen as varlen
from tests.attention_checks import FLOOR, max_error, run_forward_backward, seed_of
from tests.tolerance import assert_within_tolerance

LOW = [torch.float16, torch.bfloat16]

# On a GPU machine Triton compiles (no interpreter for CPU tensors); there the CUDA cases of test_attention.py run
# these kernels, since Hopper takes them by default.
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU runs of the Triton kernels need TRITON_INTERPRET=1")


@pytest.fixture
def launched(monkeypatch):
    """Force the TMA kernels and record (kernel name, its constexpr flags) of every attention launch. The tiles are
    chosen for an H100's shared memory (this CPU would answer 99 KB, which no d128 tile pair fits)."""
    monkeypatch.setenv("GENFAST_ATTENTION_TMA", "1")
    monkeypatch.setattr(configs, "shared_limit", lambda: 232448)
    calls = []
    launch = kernels._launch

    def recording(kernel, grid, args, kwargs, autotune=None):
        calls.append((kernel.fn.__name__, kwargs))
        return launch(kernel, grid, args, kwargs, autotune)

    monkeypatch.setattr(kernels, "_launch", recording)
    return calls


def _names(calls):
    return [name for name, _ in calls]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", list(dense.CASES))
def test_tma_paths_match_spec(launched, dtype, case):
    shape_q, shape_k, options = dense.CASES[case]
    q, k, v = dense._make(shape_q, shape_k, dtype, "cpu")
    dense._check_against_spec("cpu", "triton", q, k, v, **options)
    assert _names(launched) == ["_fwd_tma_kernel", "_bwd_dkdv_kernel"]
    assert launched[1][1]["TMA"] and launched[1][1]["DQ_ATOMIC"] == 1  # 2 (bulk TMA reduction) on a GPU


# The forward goes by pairs of key tiles (an odd count takes its first tile alone) up to head dim 128, one tile at a
# time above: runs of 1-6 tiles of 16 keys in each of its three runs (window edges, full tiles, causal diagonal).
@pytest.mark.parametrize("shape_q, shape_k, options", [
    ((1, 2, 37, 160), (1, 2, 53, 160), {"causal": True}),
    ((1, 2, 70, 32), (1, 2, 96, 32), {"window": (40, 23)}),
    ((1, 2, 33, 16), (1, 2, 81, 16), {}),
    ((1, 2, 50, 16), (1, 2, 50, 16), {"causal": True}),
], ids=["d160-one-tile-at-a-time", "window-runs", "odd-tiles", "causal-even"])
def test_tma_forward_tile_pairs(launched, shape_q, shape_k, options):
    q, k, v = dense._make(shape_q, shape_k, torch.bfloat16, "cpu", seed=3)
    dense._check_against_spec("cpu", "triton", q, k, v, **options)
    assert _names(launched)[0] == "_fwd_tma_kernel"


@pytest.mark.parametrize("kind", ["bool-2d", "additive-heads"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tma_paths_with_masks(launched, kind, causal):
    dtype = torch.bfloat16
    q, k, v = dense._make((2, 2, 17, 16), (2, 2, 21, 16), dtype, "cpu", seed=1)
    dense._check_against_spec("cpu", "triton", q, k, v, attn_mask=dense._masks(kind, 2, 2, 17, 21, dtype, "cpu"),
                              causal=causal)
    # A mask keeps the forward on the other kernel (its loads beside the in-flight scores spill on sm_90a), and
    # dQ in its own pass (every five-matmul tile measured spills with a mask on Hopper); K, V, Q, dO come
    # through descriptors.
    assert _names(launched) == ["_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"]
    assert launched[1][1]["TMA"] and launched[1][1]["DQ_ATOMIC"] == 0


def test_tma_paths_with_dropout(launched):
    """The same Philox keep mask as the spec: bf16 outputs and gradients within the rule of the dropped spec."""
    dtype, p = torch.bfloat16, 0.3
    q, k, v = dense._make((2, 4, 17, 16), (2, 2, 19, 16), dtype, "cpu", seed=6)
    w_out = torch.randn(q.shape, dtype=torch.float64)
    w_lse = torch.randn(q.shape[:3], dtype=torch.float64)

    def ours(q, k, v):
        with genfast.backend("triton"):
            return attention(q, k, v, dropout_p=p, causal=True, return_lse=True,
                             generator=torch.Generator().manual_seed(7))

    def spec(compute_dtype):
        return lambda q, k, v: attention_ref(q, k, v, dropout_p=p, causal=True, return_lse=True, seed=seed_of(7),
                                             compute_dtype=compute_dtype)

    got = run_forward_backward(ours, q, k, v, w_out, w_lse)
    exact = run_forward_backward(spec(torch.float64), q.double(), k.double(), v.double(), w_out, w_lse)
    torch_low = run_forward_backward(spec(dtype), q, k, v, w_out, w_lse)
    for name, g, e, t in zip(("out", "lse", "dq", "dk", "dv"), got, exact, torch_low):
        floor = FLOOR[dtype] + torch.finfo(dtype).eps * e[torch.isfinite(e)].abs().max().item()
        assert_within_tolerance(name, max_error(g, e), max_error(t, e), floor)
    assert _names(launched) == ["_fwd_tma_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"]  # dQ: see the masks'
    assert launched[0][1]["DROPOUT"]


@pytest.mark.parametrize("case", ["gqa-causal", "d80-scale"])
def test_tma_paths_varlen(launched, case):
    lens_q, lens_k, hq, hk, d, options = varlen.CASES[case]
    inputs = varlen._make(lens_q, lens_k, hq, hk, d, torch.bfloat16, "cpu")
    varlen._check_against_spec("cpu", "triton", *inputs, **options)
    assert _names(launched) == ["_fwd_tma_kernel", "_bwd_dkdv_kernel"]


def test_deterministic_algorithms_take_the_separate_dq_pass(launched):
    """Atomics add dQ in a varying order; torch.use_deterministic_algorithms(True) gets the fixed-order pass, and
    both meet the rule against the spec's gradients."""
    dtype = torch.bfloat16
    q, k, v = dense._make((1, 4, 33, 32), (1, 2, 40, 32), dtype, "cpu", seed=2)
    grad = torch.randn(q.shape).to(dtype)
    causal = window_bounds(True, -1, -1, q.shape[2], k.shape[2])
    out, lse = kernels.attention_fwd(q, k, v, None, None, 0.0, 0.2, causal)
    atomic = kernels.attention_bwd(grad, None, q, k, v, out, lse, None, None, 0.0, 0.2, causal)
    assert _names(launched) == ["_fwd_tma_kernel", "_bwd_dkdv_kernel"] and launched[1][1]["DQ_ATOMIC"]
    launched.clear()
    torch.use_deterministic_algorithms(True)
    try:
        fixed = kernels.attention_bwd(grad, None, q, k, v, out, lse, None, None, 0.0, 0.2, causal)
    finally:
        torch.use_deterministic_algorithms(False)
    assert _names(launched) == ["_bwd_dkdv_kernel", "_bwd_dq_kernel"] and not launched[0][1]["DQ_ATOMIC"]
    exact = [t.double().requires_grad_(True) for t in (q, k, v)]
    attention_ref(*exact, causal=True, scale=0.2).backward(grad.double())
    low = [t.clone().requires_grad_(True) for t in (q, k, v)]
    attention_ref(*low, causal=True, scale=0.2).backward(grad)
    for name, a, b, e, t in zip(("dq", "dk", "dv"), atomic, fixed, exact, low):
        floor = FLOOR[dtype] + torch.finfo(dtype).eps * e.grad.abs().max().item()
        for got in (a, b):
            assert_within_tolerance(name, max_error(got, e.grad), max_error(t.grad, e.grad), floor)


def test_fp32_and_d256_take_the_separate_dq_pass():
    """Where no measured tile holds dQ beside dK/dV without spilling (fp32's FMA dots, head dim 256)."""
    assert configs.five_matmul_backward(2, 128) and configs.five_matmul_backward(2, 64)
    assert not configs.five_matmul_backward(4, 64) and not configs.five_matmul_backward(2, 256)


def test_tma_needs_a_layout_descriptors_can_describe():
    q = torch.randn(1, 2, 8, 16)
    full = window_bounds(False, -1, -1, 8, 8)
    with pytest.raises(ValueError, match="tma=True"):
        kernels.attention_fwd(q, q, q, None, None, 0.0, 0.25, full, tma=True)  # fp32
    h = torch.randn(1, 2, 8, 20, dtype=torch.bfloat16)[..., :12]  # rows 40 bytes apart: not a 16-byte multiple
    assert not kernels.tma_eligible(h) and kernels.tma_eligible(h.contiguous()[..., :8].contiguous())
    assert not kernels.use_tma(q, q, q)  # CPU tensors take it only when asked


def test_tma_kernel_keeps_the_forward_arguments():
    """One launcher feeds both forwards: their argument lists must stay the same."""
    assert attention_sm90._fwd_tma_kernel.fn.arg_names == kernels._fwd_kernel.fn.arg_names


def _padded(shape, row, seed):
    """A bf16 [B, H, N, D] view whose rows are ``row`` elements apart (D < row): aligned rows, odd D."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape[:3], row, generator=gen).to(torch.bfloat16)[..., :shape[3]]


def test_backward_takes_no_descriptors_where_dq_sum_rows_would_be_unaligned(launched):
    """Issue 25, fix 5: q, k, v and dO with 32-byte rows but D = 10 pass TMA's rules, while the fp32 dQ sum a
    descriptor would reduce into has rows 40 bytes apart: the backward keeps pointer loads (and still meets the
    rule); the forward, which has no such buffer, keeps its descriptors."""
    q, k, v, grad = (_padded((1, 2, 19, 10), 16, seed) for seed in range(4))
    dq_sum = torch.zeros(q.shape, dtype=torch.float32)
    assert kernels.tma_eligible(q, k, v, grad) and not kernels.tma_eligible(q, k, v, grad, accumulators=(dq_sum,))
    with pytest.raises(ValueError, match="multiple of 4"):
        kernels.use_tma(q, k, v, grad, accumulators=(dq_sum,), tma=True)
    causal = window_bounds(True, -1, -1, q.shape[2], k.shape[2])
    out, lse = kernels.attention_fwd(q, k, v, None, None, 0.0, 0.3, causal)
    got = kernels.attention_bwd(grad, None, q, k, v, out, lse, None, None, 0.0, 0.3, causal)
    assert _names(launched) == ["_fwd_tma_kernel", "_bwd_dkdv_kernel"]
    assert not launched[1][1]["TMA"] and launched[1][1]["DQ_ATOMIC"] == 1
    exact = [t.double().requires_grad_(True) for t in (q, k, v)]
    attention_ref(*exact, causal=True, scale=0.3).backward(grad.double())
    low = [t.clone().requires_grad_(True) for t in (q, k, v)]
    attention_ref(*low, causal=True, scale=0.3).backward(grad)
    for name, g, e, t in zip(("dq", "dk", "dv"), got, exact, low):
        floor = FLOOR[torch.bfloat16] + torch.finfo(torch.bfloat16).eps * e.grad.abs().max().item()
        assert_within_tolerance(name, max_error(g, e.grad), max_error(t.grad, e.grad), floor)


def test_scratch_allocator_is_the_launch_devices(monkeypatch):
    """Issue 25, fix 4: descriptor scratch comes from the device of the launch's tensors, not from the first device
    genfast ever saw; an allocator the caller set is left alone. (Triton keeps it in a ContextVar: each body runs
    in a copy of the context, so nothing leaks into other tests.)"""
    def ours_for_two_devices():
        allocators = []
        for index in (0, 1, 0):
            kernels.set_scratch_allocator(torch.device("cuda", index))
            allocators.append(_allocation._allocator.get())
        return allocators

    allocators = contextvars.copy_context().run(ours_for_two_devices)
    asked = []
    monkeypatch.setattr(torch, "empty", lambda size, dtype, device: asked.append(torch.device(device)) or size)
    for allocator in allocators:
        allocator(256, 128, None)
    assert asked == [torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cuda", 0)]
    monkeypatch.undo()

    def callers_own_is_kept():
        def mine(size, alignment, stream):
            raise AssertionError("never called here")

        triton.set_allocator(mine)
        kernels.set_scratch_allocator(torch.device("cuda", 1))
        return _allocation._allocator.get() is mine

    assert contextvars.copy_context().run(callers_own_is_kept)
