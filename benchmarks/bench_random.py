"""Benchmarks of genfast's Philox stream (philox_noise) against torch's own generators.

Replaced row (``replaced``): ``genfast.ops.philox_noise(seed, n, normal=True)`` against ``torch.randn(n)``, at the
suite's size (4M normals on a CPU) and a small one (64K), where the threads' start is a larger share.
"""

from __future__ import annotations

import torch

import genfast
from benchmarks.harness import BenchCase, ReplacedCase, genfast_providers, with_backend


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


def replaced(device: torch.device, quick: bool = False) -> list[ReplacedCase]:
    sizes = [1 << 16] if quick else [1 << 16, 1 << (26 if device.type == "cuda" else 22)]
    out = []
    for numel in sizes:
        def setup(numel=numel):
            seed = torch.tensor([1234], device=device)
            return (lambda: genfast.ops.philox_noise(seed, numel, normal=True),
                    lambda: torch.randn(numel, device=device))
        out.append(ReplacedCase("random", "genfast.ops.philox_noise(normal=True)", f"normal n={numel}",
                                "torch.randn", setup))
    return out
