"""Benchmarks of the GAN models (genfast/models/dcgan.py): whole-model inference and training, fused vs reference.

Cases (DCGAN 64x64 RGB, nz 100, ngf = ndf = 64, the paper's sizes):
- ``dcgan generator eval``: G(z) under torch.no_grad() in eval mode, batch 256 on a GPU (32 on a CPU); in images/s
  that is batch / (ms / 1000). genfast folds every BatchNorm + ReLU (and the final Tanh) into its kernel.
- ``dcgan train step``: one full GAN step (D on real and fake, D update, G update through D, both Adam), batch 128
  on a GPU (16 on a CPU); iterations/s = 1000 / ms. In training, BatchNorm uses batch statistics, so genfast runs
  its kernel for the transposed convolution and torch's BatchNorm after it (see genfast/nn/conv_transpose.py).
Providers: ``genfast-<backend>`` (each kernel backend that serves conv_transpose2d here, the Triton interpreter
excluded) and ``genfast-auto``; ``reference`` (the same model under genfast.backend("reference"): torch's
conv_transpose2d in fp32 plus the epilogue); ``torch-eager`` (the same weights in plain nn.ConvTranspose2d /
nn.BatchNorm2d / nn.ReLU / nn.Tanh modules: cuDNN on a GPU). FLOPs: the generator's transposed convolutions,
2 * N * C_in * C_out * KH * KW * H_in * W_in each (x3 for forward + backward in the train step, D not counted).

Replaced row (``replaced``): ``genfast.fuse(G)`` of the plain-torch generator (``plain_torch_generator``) against
that generator itself, eval under no_grad, at the suite's batch and twice it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import genfast
from benchmarks.bench_conv_transpose import flops
from benchmarks.harness import BenchCase, ReplacedCase, genfast_providers
from genfast.models.dcgan import DCGANConfig, Discriminator, Generator

FAMILY = "models_gans"
OP_EVAL = "dcgan generator eval"
OP_TRAIN = "dcgan train step"


def plain_torch_generator(G: Generator) -> nn.Sequential:
    """The same generator in torch's own modules, holding a copy of G's weights (identical state_dict keys)."""
    layers = []
    for block in G.net:
        conv = block.conv
        seq = [nn.ConvTranspose2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                  bias=conv.bias is not None)]
        if block.norm is not None:
            seq.append(nn.BatchNorm2d(conv.out_channels))
        seq.append(nn.ReLU() if isinstance(block.act, nn.ReLU) else nn.Tanh())
        layers.append(nn.Sequential(*seq))
    model = nn.Sequential(*layers)
    model.load_state_dict(G.net.state_dict())
    return model.to(next(G.parameters()).device)


def _models(device, dtype, seed=0):
    torch.manual_seed(seed)
    config = DCGANConfig(image_size=64, channels=3)
    G, D = Generator(config).to(device, dtype), Discriminator(config).to(device, dtype)
    return config, G, D


def _providers(device) -> list[tuple[str, str | None]]:
    return [(f"genfast-{b}", b) for b in genfast_providers("conv_transpose2d", device)] + [
        ("genfast-auto", "auto"), ("reference", "reference"), ("torch-eager", None)]


def _eval_case(device, dtype, batch, provider, backend) -> BenchCase:
    def setup():
        config, G, _ = _models(device, dtype)
        G.eval()
        model = plain_torch_generator(G).to(dtype).eval() if backend is None else G.net
        z = torch.randn(batch, config.latent_dim, 1, 1, device=device, dtype=dtype)

        def call():
            with genfast.backend(backend or "auto"), torch.no_grad():
                return model(z)
        return call

    return BenchCase(FAMILY, OP_EVAL, f"{_name(dtype)} 64x64 B{batch}", provider, setup, flops=_generator_flops(batch))


def _train_case(device, dtype, batch, provider, backend) -> BenchCase:
    def setup():
        config, G, D = _models(device, dtype)
        gen = plain_torch_generator(G).to(dtype) if backend is None else G.net
        opt_g = torch.optim.Adam(gen.parameters(), 2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(D.parameters(), 2e-4, betas=(0.5, 0.999))
        real = torch.rand(batch, 3, 64, 64, device=device, dtype=dtype) * 2 - 1
        ones = torch.ones(batch, device=device)
        zeros = torch.zeros(batch, device=device)

        def call():
            with genfast.backend(backend or "auto"):
                fake = gen(torch.randn(batch, config.latent_dim, 1, 1, device=device, dtype=dtype))
                loss_d = (F.binary_cross_entropy_with_logits(D(real).float(), ones)
                          + F.binary_cross_entropy_with_logits(D(fake.detach()).float(), zeros))
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
                loss_g = F.binary_cross_entropy_with_logits(D(fake).float(), ones)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
            return loss_g
        return call

    return BenchCase(FAMILY, OP_TRAIN, f"{_name(dtype)} 64x64 B{batch}", provider, setup,
                     flops=3 * _generator_flops(batch))


def _generator_flops(batch: int) -> float:
    # Counted on the plain-torch twin: genfast's blocks call the op directly, so no ConvTranspose2d hook fires.
    return flops(plain_torch_generator(Generator(DCGANConfig(image_size=64, channels=3))), (batch, 100, 1, 1))


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    if quick:
        eval_batch, train_batch, dtypes = 4, 2, [torch.float32]
    elif device.type == "cuda":
        eval_batch, train_batch, dtypes = 256, 128, [torch.float32, torch.bfloat16]
    else:
        eval_batch, train_batch, dtypes = 32, 16, [torch.float32]
    out = []
    for dtype in dtypes:
        for provider, backend in _providers(device):
            out.append(_eval_case(device, dtype, eval_batch, provider, backend))
            out.append(_train_case(device, dtype, train_batch, provider, backend))
    return out


def replaced(device: torch.device, quick: bool = False) -> list[ReplacedCase]:
    batch = 4 if quick else (256 if device.type == "cuda" else 32)
    out = []
    for b in [batch] if quick else [batch, 2 * batch]:
        def setup(b=b):
            config, G, _ = _models(device, torch.float32)
            eager = plain_torch_generator(G.eval()).eval()
            fused, _ = genfast.fuse(eager, inplace=False)
            z = torch.randn(b, config.latent_dim, 1, 1, device=device)

            def run(model):
                def call():
                    with torch.no_grad():
                        return model(z)
                return call
            return run(fused), run(eager)
        out.append(ReplacedCase(FAMILY, "genfast.fuse(dcgan generator)", f"float32 64x64 B{b} eval",
                                "the same generator in torch modules", setup))
    return out
