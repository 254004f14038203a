"""Benchmark of the gated PixelCNN's sampler (genfast/models/pixelcnn.py): cached against the naive loop.

Case: ``pixelcnn sample`` — ``PixelCNN.sample(n)`` with the default model (16x16 grayscale, 16 levels, hidden 36,
5 layers; a 64-image grid on a GPU, 8 images on a CPU, where the naive loop of a 64-image grid takes minutes).
Providers:
- ``genfast-auto``: the default sampler: each row's vertical stack computed once from the cached rows above it,
  each pixel's horizontal stack on the columns that reach it, every value drawn by ``genfast.ops.sample_tokens``;
- ``naive-loop``: ``sample(cache=False)``: the whole network on the whole image for every draw.
Both draw identical images for one generator (tests/test_models_pixelcnn.py). The replaced row times the two
alternately, 21 repetitions, and reports the median ratio.
"""

from __future__ import annotations

import torch

from benchmarks.harness import BenchCase, ReplacedCase
from genfast.models.pixelcnn import PixelCNN, PixelCNNConfig

FAMILY = "models_pixelcnn"
OP = "pixelcnn sample"


def _setup(device: torch.device, quick: bool) -> tuple[PixelCNN, int]:
    torch.manual_seed(0)
    config = PixelCNNConfig(image_size=8, hidden=12, layers=3) if quick else PixelCNNConfig()
    n = 2 if quick else (64 if device.type == "cuda" else 8)
    return PixelCNN(config).to(device).eval(), n


def _label(quick: bool, device: torch.device) -> str:
    return "1x8x8 n2" if quick else f"1x16x16 L16 n{64 if device.type == 'cuda' else 8}"


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    def provider(cache: bool):
        def setup():
            model, n = _setup(device, quick)
            return lambda: model.sample(n, generator=torch.Generator(device).manual_seed(0), cache=cache)
        return setup

    return [BenchCase(FAMILY, OP, _label(quick, device), "genfast-auto", provider(True)),
            BenchCase(FAMILY, OP, _label(quick, device), "naive-loop", provider(False))]


def replaced(device: torch.device, quick: bool = False) -> list[ReplacedCase]:
    def setup():
        model, n = _setup(device, quick)
        return (lambda: model.sample(n, generator=torch.Generator(device).manual_seed(0)),
                lambda: model.sample(n, generator=torch.Generator(device).manual_seed(0), cache=False))

    return [ReplacedCase(FAMILY, "PixelCNN.sample (cached)", _label(quick, device), "naive full-image loop", setup)]
