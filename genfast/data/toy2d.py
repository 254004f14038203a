"""Two-dimensional toy densities for normalizing flows: two moons and concentric rings, drawn from a generator.

Each returns float32 points [n, 2], roughly standardised (mean near 0, spread near 1), so that a flow starting from
the identity map begins close to them.
"""

from __future__ import annotations

import math

import torch

TOY_DATASETS = ("moons", "rings")


def _check(n: int, noise: float) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10_000_000:
        raise ValueError(f"n must be an int in [1, 10000000], got {n!r}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 10:
        raise ValueError(f"noise must be a number in [0, 10], got {noise!r}")


def two_moons(n: int, *, noise: float = 0.05, generator: torch.Generator | None = None) -> torch.Tensor:
    """Two interleaved half circles (radius 1, the second shifted by (1, -0.5) and flipped), Gaussian noise of
    standard deviation ``noise``, then centred and scaled by 1/0.7 (about unit spread)."""
    _check(n, noise)
    upper = torch.rand(n, generator=generator) < 0.5
    angle = torch.rand(n, generator=generator) * math.pi
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=generator)
    return (points - torch.tensor([0.5, 0.25])) / 0.7


def rings(n: int, *, noise: float = 0.05, generator: torch.Generator | None = None) -> torch.Tensor:
    """Two concentric circles of radius 0.5 and 1.5 (equally likely), Gaussian noise of deviation ``noise``."""
    _check(n, noise)
    radius = torch.where(torch.rand(n, generator=generator) < 0.5, 0.5, 1.5)
    angle = torch.rand(n, generator=generator) * (2 * math.pi)
    points = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], 1)
    return points + noise * torch.randn(n, 2, generator=generator)


def toy_points(name: str, n: int, *, noise: float = 0.05, generator: torch.Generator | None = None) -> torch.Tensor:
    """``name`` in TOY_DATASETS -> [n, 2]."""
    if name == "moons":
        return two_moons(n, noise=noise, generator=generator)
    if name == "rings":
        return rings(n, noise=noise, generator=generator)
    raise ValueError(f"unknown 2-D dataset {name!r}; known: {', '.join(TOY_DATASETS)}")


__all__ = ["TOY_DATASETS", "two_moons", "rings", "toy_points"]
