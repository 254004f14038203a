"""Benchmarks of genfast's Philox stream (philox_noise) against torch's own generators."""

from __future__ import annotations

import torch

import genfast
from benchmarks.harness import BenchCase, genfast_providers, with_backend


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    numel = 1 << (16 if quick else (26 if device.type == "cuda" else 22))
    seed = torch.tensor([1234], device=device)
    label = f"normal n={numel}"
    nbytes = 4 * numel  # written once

    def ours(name):
        return lambda: with_backend(name, lambda: genfast.ops.philox_noise(seed, numel, normal=True))

    out = [BenchCase("random", "philox_noise", label, f"genfast-{name}", ours(name), bytes=nbytes)
           for name in genfast_providers("philox_noise", device)]
    out.append(BenchCase("random", "philox_noise", label, "torch-randn",
                         lambda: lambda: torch.randn(numel, device=device), bytes=nbytes))
    return out
