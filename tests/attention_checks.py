"""Helpers shared by the attention tests (tests/test_attention*.py): the tolerance floor, the Philox seed attention()
draws, a forward+backward run that returns every output, and the error measure (CONTRIBUTING.md section 3)."""

import importlib

import torch

from tests.tolerance import assert_within_tolerance, max_error

# The floor: one ulp of the tensor's largest magnitude (finfo.eps * max|exact|) plus a tiny absolute term. It
# matters only where torch's own error is near zero by luck of the shape: with N = 1 softmax is exactly 1, the
# written-out math in bf16 is then almost exact, while a fused kernel still rounds dS to bf16 for its matmul
# (as FlashAttention does) and its dq (carrying the lse gradient, magnitude ~2) lands ~1 ulp off.
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def seed_of(generator_seed: int) -> torch.Tensor:
    """The Philox seed attention() draws from torch.Generator().manual_seed(generator_seed)."""
    gen = torch.Generator().manual_seed(generator_seed)
    return torch.randint(0, 2**62, (1,), generator=gen, dtype=torch.int64)


def run_forward_backward(fn, q, k, v, w_out, w_lse):
    """Forward with lse, then backward of sum(out * w_out) + sum(finite lse * w_lse); returns all five tensors."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*leaves)
    finite = torch.isfinite(lse)
    loss = (out.double() * w_out).sum() + (torch.where(finite, lse.double(), 0.0) * w_lse).sum()
    loss.backward()
    return [out.detach(), lse.detach()] + [t.grad for t in leaves]


def assert_grads_meet_the_rule(ours, spec, q, k, v, w_out):
    """``ours(q, k, v) -> out`` (no lse: the SDPA paths) against ``spec(q, k, v, compute_dtype) -> out``: the output
    and dq, dk, dv of ``sum(out * w_out)`` keep q's dtype and are within the rule of the fp64 spec, torch's error
    being the spec's in q's dtype. Returns ours' [out, dq, dk, dv]."""
    dtype = q.dtype
    w_lse = torch.zeros(q.shape[:-1], dtype=torch.float64)  # unused: the SDPA paths return no lse

    def without_lse(fn):
        return lambda q, k, v: (fn(q, k, v), torch.zeros(q.shape[:-1]))

    got = run_forward_backward(without_lse(ours), q, k, v, w_out, w_lse)
    exact = run_forward_backward(without_lse(lambda *t: spec(*t, torch.float64)), q.double(), k.double(), v.double(),
                                 w_out, w_lse)
    torch_low = run_forward_backward(without_lse(lambda *t: spec(*t, dtype)), q, k, v, w_out, w_lse)
    got, exact, torch_low = ([t[0]] + t[2:] for t in (got, exact, torch_low))
    for name, g, e, t in zip(("out", "dq", "dk", "dv"), got, exact, torch_low):
        assert g.dtype == dtype, name
        floor = FLOOR[dtype] + torch.finfo(dtype).eps * e.abs().max().item()
        assert_within_tolerance(name, max_error(g, e), max_error(t, e), floor)
    return got


def assert_sdpa_dtype_choice_meets_the_rule(monkeypatch, upcast, ours, spec, q, k, v, w_out):
    """The CPU SDPA path both ways: with q's dtype in ``CPU_SLOW_HALF_DTYPES`` (``upcast``: fp32 SDPA when gradients
    are needed) and without, gradients within the rule each time (:func:`assert_grads_meet_the_rule`); the way under
    test comes first, and the two must differ, which shows the fp32 path really ran."""
    common = importlib.import_module("genfast.ops._attention_common")  # where sdpa_inputs reads it
    monkeypatch.setattr(common, "CPU_SLOW_HALF_DTYPES", frozenset({q.dtype} if upcast else ()))
    got = assert_grads_meet_the_rule(ours, spec, q, k, v, w_out)
    monkeypatch.setattr(common, "CPU_SLOW_HALF_DTYPES", frozenset(() if upcast else {q.dtype}))
    other = assert_grads_meet_the_rule(ours, spec, q, k, v, w_out)
    assert any(not torch.equal(a, b) for a, b in zip(got[1:], other[1:]))


class AttentionKernelCalls:
    """Counts the Triton kernel launches (forward and backward) of genfast's attention, to show genfast really ran."""

    def __init__(self, monkeypatch):
        from genfast.kernels import attention as attention_kernels

        self.fwd = self.bwd = 0
        fwd, bwd = attention_kernels.attention_fwd, attention_kernels.attention_bwd

        def counted_fwd(*args, **kwargs):
            self.fwd += 1
            return fwd(*args, **kwargs)

        def counted_bwd(*args, **kwargs):
            self.bwd += 1
            return bwd(*args, **kwargs)

        monkeypatch.setattr(attention_kernels, "attention_fwd", counted_fwd)
        monkeypatch.setattr(attention_kernels, "attention_bwd", counted_bwd)
