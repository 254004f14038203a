"""Benchmark of the energy-based model (genfast/models/ebm.py): a K-step Langevin chain, fused step against unfused.

Case: ``ebm langevin chain`` — ``EBM.langevin`` for K steps from uniform noise, 32x32 grayscale, the default energy
net (32 features, spectral norm, eval mode so that every provider sees the same fixed weights). Each step is the
energy gradient by autograd (the same for every provider) followed by the update. K = 60 and batch 128 on a GPU
(the usual training chain); K = 20 and batch 16 on a CPU, where the convolutions make a full chain take seconds.
Providers:
- ``genfast-<backend>`` / ``genfast-auto``: ``EBM.langevin``, i.e. one fused ``langevin_step`` per step (update,
  Philox noise and clamp in one pass);
- ``reference``: the same chain under genfast.backend("reference") (``langevin_step_ref``);
- ``torch-eager``: the step as people write it, ``(x - a * g + s * torch.randn_like(x)).clamp(-1, 1)``;
- ``torch-compile`` (CUDA only): that step under torch.compile.
The energy gradient dominates a chain, so the speedup of the whole chain is bounded by the update's share of it;
the per-step op itself is benchmarked on its own in bench_latent.py.
"""

from __future__ import annotations

import torch

import genfast
from benchmarks.harness import BenchCase, genfast_providers
from genfast.models.ebm import EBM, EBMConfig

FAMILY = "models_ebm"
OP = "ebm langevin chain"


def _setup_model(device: torch.device) -> EBM:
    torch.manual_seed(0)
    return EBM(EBMConfig(image_size=32, channels=1, buffer_size=256)).to(device).eval()


def unfused_chain(model: EBM, x: torch.Tensor, steps: int, step) -> torch.Tensor:
    c = model.config
    for _ in range(steps):
        grad = model.energy_grad(x).clamp_(-c.grad_clip, c.grad_clip)
        x = step(x, grad, c.step_size, c.noise_scale)
    return x


def eager_step(x, grad, step_size, noise_scale):
    return (x - step_size * grad + noise_scale * torch.randn_like(x)).clamp(-1, 1)


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    if quick:
        steps, batch = 3, 4
    elif device.type == "cuda":
        steps, batch = 60, 128
    else:
        steps, batch = 20, 16
    label = f"K{steps} B{batch} 1x32x32"

    def fused(backend: str):
        def setup():
            model = _setup_model(device)
            start = torch.rand(batch, 1, 32, 32, device=device) * 2 - 1

            def run():
                with genfast.backend(backend):
                    return model.langevin(start, steps)
            return run
        return setup

    def unfused(step):
        def setup():
            model = _setup_model(device)
            start = torch.rand(batch, 1, 32, 32, device=device) * 2 - 1
            return lambda: unfused_chain(model, start, steps, step)
        return setup

    providers = {f"genfast-{b}": fused(b) for b in genfast_providers("langevin_step", device)}
    providers["genfast-auto"] = fused("auto")
    providers["reference"] = fused("reference")
    providers["torch-eager"] = unfused(eager_step)
    if device.type == "cuda":
        providers["torch-compile"] = unfused(torch.compile(eager_step))
    return [BenchCase(FAMILY, OP, label, provider, setup) for provider, setup in providers.items()]
