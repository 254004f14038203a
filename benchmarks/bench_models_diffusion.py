"""Benchmarks of the diffusion UNet end to end: DDIM sampling and training steps, fused against reference.

``ddim_sample``: one call of DiffusionPipeline.sample (50 DDIM steps, eta = 0, batch 64; on a GPU the UNet in
bf16 at 32x32 and 64x64, on a CPU the tiny config at 8x8 with a small batch and 10 steps). images/s =
batch * 1000 / ms. ``train_step``: one AdamW step on the epsilon loss (bf16 autocast on a GPU), batch 64.

Providers: ``genfast-auto`` (genfast's kernels wherever they serve: Triton attention and transposed
convolution, the fused scheduler step), ``reference`` (every genfast op on its reference: torch's SDPA and
conv_transpose2d, the step written out as diffusers does), and on a GPU the same two with the denoising step
captured in a CUDA graph (``genfast-auto-cudagraph``, ``reference-cudagraph``: no per-step launches from
Python). The UNet's convolutions, GroupNorms and linears are torch's in every provider.
"""

from __future__ import annotations

import torch

from benchmarks.harness import BenchCase, with_backend
from genfast.diffusion import DDIMScheduler, DiffusionPipeline
from genfast.models.unet import UNet, UNetConfig, diffusion_loss

FAMILY = "models_diffusion"


def _settings(device: torch.device, quick: bool) -> list[tuple[str, int, int]]:
    """(preset, batch, steps) per case."""
    if quick:
        return [("tiny", 2, 2)]
    if device.type == "cuda":
        return [("32", 64, 50), ("64", 64, 50)]
    return [("tiny", 8, 10)]


def _unet(preset: str, device: torch.device, dtype: torch.dtype) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig.preset(preset, num_classes=0)).to(device=device, dtype=dtype).eval()


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    out: list[BenchCase] = []
    providers = [("genfast-auto", "auto", False), ("reference", "reference", False)]
    if device.type == "cuda":
        providers += [("genfast-auto-cudagraph", "auto", True), ("reference-cudagraph", "reference", True)]
    sample_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for preset, batch, steps in _settings(device, quick):
        size = UNetConfig.preset(preset).image_size
        dtype_name = str(sample_dtype).replace("torch.", "")
        label = f"{size}x{size} b{batch} {steps} steps {dtype_name}"
        for name, backend, graph in providers:
            def sample_setup(preset=preset, batch=batch, steps=steps, backend=backend, graph=graph):
                pipe = DiffusionPipeline(_unet(preset, device, sample_dtype), DDIMScheduler())
                gen = torch.Generator(device).manual_seed(0)
                run = with_backend(backend, lambda: pipe.sample(batch, steps, generator=gen, cuda_graph=graph))
                run()  # compiles the kernels and, with graph, captures the step once
                return run

            out.append(BenchCase(FAMILY, "ddim_sample", label, name, sample_setup))

        train_label = f"{size}x{size} b{batch} {'bf16 autocast' if device.type == 'cuda' else 'float32'}"
        for name, backend, graph in providers:
            if graph:
                continue

            def train_setup(preset=preset, batch=batch, backend=backend):
                unet = _unet(preset, device, torch.float32).train()
                scheduler = DDIMScheduler()
                optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
                x0 = torch.randn(batch, 3, unet.config.image_size, unet.config.image_size, device=device)
                gen = torch.Generator(device).manual_seed(0)

                def step():
                    loss = diffusion_loss(unet, scheduler, x0, None, gen)  # the forward runs under autocast
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()

                return with_backend(backend, step)

            out.append(BenchCase(FAMILY, "train_step", train_label, name, train_setup))
    return out
