"""The autotuner's benchmark runs must leave no trace in the results (issue 25, fix 1).

On a GPU, ``triton.autotune`` launches every kept config several times on the caller's own tensors before the real
launch (Triton 3.6 even benchmarks a lone kept config). A kernel that accumulates into a buffer (the dK/dV kernel
adds dQ into an fp32 buffer with atomics) would return the sum of all those runs unless its autotuner zeroes the
buffer before each. The interpreter holds one config and never benchmarks, so these tests give the real autotuners
several configs and a stand-in for the benchmark that launches the kernel, as ``do_bench`` does, and returns a
made-up time: the first call of a new key must give what an untuned launch gives, and the spec's gradients.
"""

import os

import pytest
import torch
import triton

from genfast.kernels import _attention_configs as attention_configs
from genfast.kernels import attention as kernels
from genfast.ops import attention_ref
from genfast.ops._attention_common import window_bounds
from tests.attention_checks import FLOOR, max_error
from tests.tolerance import assert_within_tolerance

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="drives the autotuner under the Triton interpreter (CPU tensors)")

RUNS_PER_CONFIG = 3  # do_bench runs a kernel many times; three are enough to multiply an unreset sum


def _benchmarking_autotuner(monkeypatch, kernel):
    """Give ``kernel``'s autotuner two configs (the interpreter's and a wider query tile) and a ``do_bench`` that
    launches each config RUNS_PER_CONFIG times; the second config is timed faster, so it is the one kept.
    Returns the list of configs benchmarked."""
    configs = [attention_configs._INTERPRETER_CONFIG,
               triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    benchmarked = []

    def do_bench(kernel_call, quantiles):
        benchmarked.append(kernel_call)
        for _ in range(RUNS_PER_CONFIG):
            kernel_call()
        ms = 2.0 if len(benchmarked) == 1 else 1.0
        return [ms, ms, ms]

    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    # Autotuner.do_bench is a cached_property: an entry in the instance's dict takes its place.
    monkeypatch.setitem(kernel.__dict__, "do_bench", do_bench)
    return benchmarked


def _inputs(dtype):
    gen = torch.Generator().manual_seed(25)
    q = torch.randn(1, 4, 37, 16, generator=gen).to(dtype)
    k, v = (torch.randn(1, 2, 29, 16, generator=gen).to(dtype) for _ in range(2))
    grad = torch.randn(q.shape, generator=gen).to(dtype)
    return q, k, v, grad


@pytest.mark.parametrize("tma", [False, True], ids=["pointer-loads", "descriptors"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_first_backward_with_benchmarked_configs_gives_the_true_dq(monkeypatch, dtype, tma):
    monkeypatch.delenv("GENFAST_AUTOTUNE", raising=False)
    monkeypatch.setenv("GENFAST_ATTENTION_TMA", "1" if tma else "0")
    q, k, v, grad = _inputs(dtype)
    causal = window_bounds(True, -1, -1, q.shape[2], k.shape[2])
    out, lse = kernels.attention_fwd(q, k, v, None, None, 0.0, 0.25, causal, autotune=False)
    # The five-matmul form (dQ added with atomics) is the one that accumulates; make sure it is the one tested.
    assert attention_configs.five_matmul_backward(q.element_size(), 16)
    untuned = kernels.attention_bwd(grad, None, q, k, v, out, lse, None, None, 0.0, 0.25, causal,
                                    autotune=False)
    benchmarked = _benchmarking_autotuner(monkeypatch, kernels._bwd_dkdv_kernel)
    tuned = kernels.attention_bwd(grad, None, q, k, v, out, lse, None, None, 0.0, 0.25, causal)
    assert len(benchmarked) == 2, "the autotuner's benchmarking path did not run"
    assert kernels._bwd_dkdv_kernel.best_config.kwargs["BLOCK_M"] == 32
    # A wider query tile only regroups the fp32 sums: the untuned launch within a few ulps of dQ's magnitude.
    for name, got, want in zip(("dq", "dk", "dv"), tuned, untuned):
        scale = want.double().abs().max().item()
        assert max_error(got, want) <= 4 * torch.finfo(dtype).eps * scale, name

    exact = [t.double().requires_grad_(True) for t in (q, k, v)]
    attention_ref(*exact, causal=True, scale=0.25).backward(grad.double())
    low = [t.clone().requires_grad_(True) for t in (q, k, v)]
    attention_ref(*low, causal=True, scale=0.25).backward(grad)
    for name, got, e, t in zip(("dq", "dk", "dv"), tuned, exact, low):
        floor = FLOOR[dtype] + torch.finfo(dtype).eps * e.grad.abs().max().item()
        assert_within_tolerance(name, max_error(got, e.grad), max_error(t.grad, e.grad), floor)


@pytest.mark.parametrize("on_gpu", [False, True], ids=["interpreter", "gpu"])
def test_every_autotuned_kernel_that_accumulates_resets_its_buffer(monkeypatch, on_gpu):
    """The audit of genfast/kernels, written down: the dK/dV kernel is the one autotuned kernel that accumulates
    into a buffer (dQacc, with atomics or a descriptor reduction), and its autotuner zeroes it before every
    benchmark run and once more before the real launch, on a GPU (every candidate config) as here. The forward,
    the dQ pass and conv_transpose's forward store each element once."""
    monkeypatch.setattr(attention_configs, "AUTOTUNE", on_gpu)
    for name, kernel in (("fwd", kernels._fwd_kernel), ("dkdv", kernels._bwd_dkdv_kernel),
                         ("dq", kernels._bwd_dq_kernel)):
        tuner = attention_configs.autotuned(name)(kernel.fn)
        assert tuner.reset_to_zero == (["dQacc"] if name == "dkdv" else []), name
        assert len(tuner.configs) > 1 if on_gpu else len(tuner.configs) == 1
    assert kernels._bwd_dkdv_kernel.reset_to_zero == ["dQacc"]
