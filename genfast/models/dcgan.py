"""DCGAN (Radford, Metz & Chintala, 2015) for 32x32 and 64x64 images, RGB or grayscale, on genfast's kernels.

Generator: latent z [B, nz] seen as [B, nz, 1, 1] -> a 4x4 map by a 4x4 transposed convolution, then one
stride-2 transposed convolution per doubling (4 -> 8 -> ... -> image_size), each followed by BatchNorm and ReLU,
the last by Tanh and no norm. Every layer is a genfast.nn.ConvTranspose2dNormAct: in eval mode the BatchNorm is
folded into the kernel's epilogue with the ReLU, and the final Tanh runs in the last kernel's epilogue, so the
generator is one kernel per layer; in training mode the BatchNorm is torch's own (batch statistics).

Discriminator: the mirror image with strided convolutions (plain torch: genfast has no kernel for forward
convolutions), BatchNorm on every layer but the first, LeakyReLU(0.2), and a final 4x4 convolution to one logit.
Weights start as the paper's N(0, 0.02) (BatchNorm scales N(1, 0.02), shifts 0): ``init_weights``.

``build_generator_layers`` / ``build_discriminator_layers`` are shared with the conditional GAN (models/cgan.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genfast.models._checkpoint import build_and_load, read_run
from genfast.models._config import ModelConfig, check_choice, check_ints
from genfast.nn import ConvTranspose2dNormAct

IMAGE_SIZES = (32, 64)


@dataclass
class DCGANConfig(ModelConfig):
    image_size: int = 32  # 32 or 64
    channels: int = 1  # 1 (grayscale) or 3 (RGB)
    latent_dim: int = 100  # nz
    g_features: int = 64  # ngf: channels of the generator's last hidden layer (doubling towards the latent)
    d_features: int = 64  # ndf: channels of the discriminator's first layer

    def __post_init__(self):
        check_image_config(self)


def check_image_config(config) -> None:
    check_choice(config, "image_size", IMAGE_SIZES)
    check_choice(config, "channels", (1, 3))
    check_ints(config, ("latent_dim", "g_features", "d_features"))


def _doublings(image_size: int) -> int:
    """Stride-2 layers between the 4x4 map and the image: 3 for 32x32, 4 for 64x64."""
    return image_size.bit_length() - 3


def build_generator_layers(in_channels: int, image_size: int, channels: int, features: int) -> nn.Sequential:
    """[B, in_channels, 1, 1] -> [B, channels, image_size, image_size] in [-1, 1]."""
    n = _doublings(image_size)
    widths = [features * 2 ** i for i in reversed(range(n))]  # e.g. 256, 128, 64 for 32x32 (ngf 64)
    layers = [ConvTranspose2dNormAct(in_channels, widths[0], 4, 1, 0, bias=False)]  # (B, 4*ngf, 4, 4)
    for c_in, c_out in zip(widths, widths[1:]):
        layers.append(ConvTranspose2dNormAct(c_in, c_out, 4, 2, 1, bias=False))  # doubles H and W
    # The output layer: no norm, tanh in the kernel's epilogue.
    layers.append(ConvTranspose2dNormAct(widths[-1], channels, 4, 2, 1, bias=False, norm=None, activation="tanh"))
    return nn.Sequential(*layers)


def build_discriminator_layers(in_channels: int, image_size: int, features: int) -> nn.Sequential:
    """[B, in_channels, image_size, image_size] -> logits [B, 1, 1, 1]."""
    n = _doublings(image_size)
    widths = [features * 2 ** i for i in range(n)]  # e.g. 64, 128, 256 for 32x32
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2)]
    for c_in, c_out in zip(widths, widths[1:]):
        layers += [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
    layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False))  # 4x4 -> 1x1
    return nn.Sequential(*layers)


def latent(batch: int, latent_dim: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard normal [batch, latent_dim] on ``device``, drawn from ``generator`` (on its own device) or the
    global generator of ``device``."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    draw_on = generator.device if generator is not None else device
    return torch.randn(batch, latent_dim, generator=generator, device=draw_on).to(device)


def init_weights(module: nn.Module) -> nn.Module:
    """DCGAN initialisation in place: (transposed) convolutions and linear maps N(0, 0.02), BatchNorm scale
    N(1, 0.02) and shift 0, embeddings N(0, 1) (torch's default). Returns the module."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module


class Generator(nn.Module):
    """z [B, latent_dim] -> images [B, channels, image_size, image_size] in [-1, 1]."""

    def __init__(self, config: DCGANConfig):
        super().__init__()
        self.config = config
        self.net = build_generator_layers(config.latent_dim, config.image_size, config.channels, config.g_features)
        init_weights(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"z must be [B, {self.config.latent_dim}], got shape {tuple(z.shape)}")
        return self.net(z[:, :, None, None])  # (B, C, S, S)

    def latent(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Standard normal latents [batch, latent_dim] on the model's device (drawn on ``generator``'s device)."""
        return latent(batch, self.config.latent_dim, generator, device or next(self.parameters()).device)

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu", *,
                        allow_nonfinite: bool = False) -> "Generator":
        """The generator of a `genfast train dcgan` run folder (or its checkpoint folder), in eval mode."""
        directory, saved = read_run(path, "dcgan")
        config = DCGANConfig.from_dict(saved["model"])
        return build_and_load(lambda: cls(config), directory, "generator",
                              allow_nonfinite=allow_nonfinite).to(device).eval()


class Discriminator(nn.Module):
    """images [B, channels, image_size, image_size] -> real/fake logits [B]."""

    def __init__(self, config: DCGANConfig):
        super().__init__()
        self.config = config
        self.net = build_discriminator_layers(config.channels, config.image_size, config.d_features)
        init_weights(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        if images.dim() != 4 or images.shape[1:] != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"images must be [B, {c.channels}, {c.image_size}, {c.image_size}], got shape "
                             f"{tuple(images.shape)}")
        return self.net(images).flatten()  # (B,)
