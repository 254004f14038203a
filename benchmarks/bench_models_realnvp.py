"""Benchmark of RealNVP (genfast/models/realnvp.py): is the affine coupling worth a fused op?

The coupling's own arithmetic is ``z = x * exp(s) + t`` and ``log_det = sum(s)`` (and the inverse). A fused op would
do it in one pass instead of eager PyTorch's four (exp, mul, add, sum) and their backward. Cases:
- ``realnvp train step`` (``torch-eager``): one optimizer step of the default digits flow (16x16, 2 scales, hidden
  64, batch 32): what the coupling arithmetic is a part of;
- ``affine coupling fwd+bwd``: that arithmetic alone, forward and backward, on every tensor shape the default flow
  gives it in one step (the 16 couplings' x, s, t), as ``torch-eager`` (``genfast.models.realnvp.affine``) and as
  ``torch-compile`` (the same function under torch.compile: inductor fuses it into one loop, which is what a
  hand-written fused kernel would do at best).
The share of the first case the second takes bounds what any fused op can gain (README, RealNVP section).
"""

from __future__ import annotations

import torch

from benchmarks.harness import BenchCase
from genfast.models.realnvp import AffineCoupling, RealNVP, RealNVPConfig, affine

FAMILY = "models_realnvp"


def _flow(device: torch.device, quick: bool) -> tuple[RealNVP, torch.Tensor]:
    torch.manual_seed(0)
    size = 8 if quick else 16
    flow = RealNVP(RealNVPConfig(kind="image", image_size=size, hidden=16 if quick else 64)).to(device)
    x = torch.rand(4 if quick else 32, 1, size, size, device=device)
    flow(x)  # actnorm's data-dependent initialisation, outside the timing
    return flow, x


def coupling_shapes(flow: RealNVP, x: torch.Tensor) -> list[torch.Size]:
    """The shapes of x at each affine coupling during one forward pass."""
    shapes: list[torch.Size] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: shapes.append(args[0].shape))
             for m in flow.modules() if isinstance(m, AffineCoupling)]
    try:
        with torch.no_grad():
            flow(x)
    finally:
        for hook in hooks:
            hook.remove()
    return shapes


def train_step(flow: RealNVP, x: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    loss = flow.bits_per_dim(x).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    def step_setup():
        flow, x = _flow(device, quick)
        opt = torch.optim.Adam(flow.parameters(), lr=1e-4)
        return lambda: train_step(flow, x, opt)

    def affine_setup(fn):
        def setup():
            flow, x = _flow(device, quick)
            g = torch.Generator(device).manual_seed(0)
            inputs = [tuple(torch.randn(shape, generator=g, device=device).requires_grad_(True) for _ in range(3))
                      for shape in coupling_shapes(flow, x)]

            def run():
                total = 0
                for xi, s, t in inputs:
                    y, log_det = fn(xi, s, t)
                    total = total + y.sum() + log_det.sum()
                total.backward()
            return run
        return setup

    label = "1x8x8 B4" if quick else "1x16x16 B32, 2 scales, hidden 64"
    return [
        BenchCase(FAMILY, "realnvp train step", label, "torch-eager", step_setup),
        BenchCase(FAMILY, "affine coupling fwd+bwd", label, "torch-eager", affine_setup(affine)),
        BenchCase(FAMILY, "affine coupling fwd+bwd", label, "torch-compile", affine_setup(torch.compile(affine))),
    ]
