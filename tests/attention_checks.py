"""Helpers shared by the attention tests (tests/test_attention*.py): the tolerance floor, the Philox seed attention()
draws, a forward+backward run that returns every output, and the error measure (CONTRIBUTING.md section 3)."""

import torch

from tests.tolerance import max_error  # noqa: F401 (re-exported for the attention tests)

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
