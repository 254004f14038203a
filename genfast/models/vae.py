"""A convolutional variational autoencoder (Kingma & Welling, 2014) on genfast's ops.

    vae = VAE(VAEConfig(image_size=32, channels=1, latent_dim=16))
    losses = vae.loss(images)                       # {"loss", "recon", "kl"}
    samples = vae.sample(64, generator=g)           # from the prior N(0, I)
    smile = vae.attribute_vector(with_attr, without_attr)
    edited = vae.add_attribute(images, smile)       # scale=-1 subtracts it
    frames = vae.interpolate(x1, x2, steps=8)

- Encoder: strided 4x4 convolutions (BatchNorm, LeakyReLU 0.2) halving the image down to 4x4, then a linear layer
  to the posterior's mean and log-variance, each [N, latent_dim].
- Decoder: a linear layer up to 4x4 features, then transposed 4x4 convolutions doubling back to the image size
  through genfast.nn.ConvTranspose2dNormAct (BatchNorm + LeakyReLU; in eval mode the norm and activation fold
  into the kernel's epilogue, one kernel per block), the last one with tanh: images in [-1, 1].
- z = genfast.ops.reparameterize(mu, logvar): the noise is drawn inside the kernel, regenerated in the backward.
- Loss per image, averaged over the batch: recon + beta * KL, where recon is the sum of squared errors over the
  pixels (the negative log-likelihood, up to a constant, of a Gaussian decoder with variance 1/2 on images in
  [-1, 1]) and KL = genfast.ops.gaussian_kl(mu, logvar), KL(q(z|x) || N(0, I)) summed over the latent dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from genfast import ops
from genfast.models._checkpoint import build_and_load, read_run
from genfast.models._config import ModelConfig, check_choice, check_int, check_number
from genfast.nn import ConvTranspose2dNormAct


@dataclass
class VAEConfig(ModelConfig):
    image_size: int = 32     # a power of two, 8..256
    channels: int = 1
    latent_dim: int = 16
    base_channels: int = 32  # encoder width after the first layer; doubles per halving, at most 8x
    beta: float = 1.0        # weight of the KL term (beta-VAE)

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or self.image_size not in (8, 16, 32, 64, 128, 256):
            raise ValueError(f"VAEConfig.image_size must be a power of two in [8, 256], got {self.image_size!r}")
        check_choice(self, "channels", (1, 3))
        check_int(self, "latent_dim")
        check_int(self, "base_channels")
        check_number(self, "beta", minimum=0.0)

    @property
    def num_stages(self) -> int:
        """Halvings from the image size down to 4x4."""
        return int(math.log2(self.image_size)) - 2

    def width(self, stage: int) -> int:
        return self.base_channels * min(2 ** stage, 8)


class VAE(nn.Module):
    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = cfg = config or VAEConfig()
        n = cfg.num_stages
        enc: list[nn.Module] = []
        in_ch = cfg.channels
        for i in range(n):  # (N, in_ch, S, S) -> (N, width(i), S/2, S/2)
            enc.append(nn.Conv2d(in_ch, cfg.width(i), 4, stride=2, padding=1, bias=i == 0))
            if i > 0:  # no norm on the first layer, as in DCGAN: it sees the raw pixels
                enc.append(nn.BatchNorm2d(cfg.width(i)))
            enc.append(nn.LeakyReLU(0.2))
            in_ch = cfg.width(i)
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        features = cfg.width(n - 1) * 16  # (N, width(n-1), 4, 4) flattened
        self.to_posterior = nn.Linear(features, 2 * cfg.latent_dim)  # -> (mu, logvar)
        self.from_latent = nn.Sequential(nn.Linear(cfg.latent_dim, features), nn.LeakyReLU(0.2))
        dec: list[nn.Module] = []
        for i in reversed(range(1, n)):  # (N, width(i), s, s) -> (N, width(i-1), 2s, 2s)
            dec.append(ConvTranspose2dNormAct(cfg.width(i), cfg.width(i - 1), 4, stride=2, padding=1, bias=False,
                                              norm="batch", activation="leaky_relu", negative_slope=0.2))
        dec.append(ConvTranspose2dNormAct(cfg.width(0), cfg.channels, 4, stride=2, padding=1, norm=None,
                                          activation="tanh"))
        self.decoder = nn.Sequential(*dec)

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu", *,
                        allow_nonfinite: bool = False) -> "VAE":
        """The VAE of a `genfast train vae` run folder (or its checkpoint folder), in eval mode."""
        directory, saved = read_run(path, "vae")
        config = VAEConfig.from_dict(saved["model"])
        return build_and_load(lambda: cls(config), directory, "model",
                              allow_nonfinite=allow_nonfinite).to(device).eval()

    # --------------------------------------------------------------------------------------------- checks
    def _check_images(self, name: str, x) -> None:
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor [N, C, H, W], got {type(x).__name__}")
        expected = (cfg.channels, cfg.image_size, cfg.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{name} must be [N, {', '.join(map(str, expected))}] for this VAE, got shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor in [-1, 1], got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty (0 images)")

    def _check_latent(self, name: str, z) -> None:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} must be a tensor [N, {self.config.latent_dim}], got {type(z).__name__}")
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"{name} must be [N, {self.config.latent_dim}], got shape {tuple(z.shape)}")

    # --------------------------------------------------------------------------------------------- model
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images [N, C, S, S] in [-1, 1] -> the posterior's (mu, logvar), each [N, latent_dim]."""
        self._check_images("x", x)
        mu, logvar = self.to_posterior(self.encoder(x)).chunk(2, dim=1)
        return mu.contiguous(), logvar.contiguous()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [N, latent_dim] -> images [N, C, S, S] in [-1, 1]."""
        self._check_latent("z", z)
        h = self.from_latent(z).view(z.shape[0], -1, 4, 4)  # (N, width(n-1), 4, 4)
        # genfast's conv_transpose2d takes no part in autocast (its input and weight must share a dtype), so the
        # decoder runs in its parameters' dtype whatever autocast made of h.
        return self.decoder(h.to(self.decoder[0][0].weight.dtype))

    def forward(self, x: torch.Tensor, *, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, mu, logvar) with z = reparameterize(mu, logvar) (noise from ``generator``, or ``noise``
        [N, latent_dim] itself)."""
        mu, logvar = self.encode(x)
        z = ops.reparameterize(mu, logvar, generator=generator, noise=noise)
        return self.decode(z), mu, logvar

    def loss(self, x: torch.Tensor, *, generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        recon, mu, logvar = self(x, generator=generator, noise=noise)
        return vae_loss(x, recon, mu, logvar, self.config.beta)

    # --------------------------------------------------------------------------------------------- use
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(mu(x)): the deterministic reconstruction."""
        return self.decode(self.encode(x)[0])

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images decoded from z ~ N(0, I), drawn from ``generator`` (on its own device) or torch's default."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        param = self.to_posterior.weight
        draw_on = generator.device if generator is not None else param.device
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=draw_on)
        return self.decode(z.to(device=param.device, dtype=param.dtype))

    def attribute_vector(self, images_with: torch.Tensor, images_without: torch.Tensor) -> torch.Tensor:
        """mean mu(images_with) - mean mu(images_without), [latent_dim]: the direction of an attribute."""
        self._check_images("images_with", images_with)
        self._check_images("images_without", images_without)
        return self.encode(images_with)[0].mean(0) - self.encode(images_without)[0].mean(0)

    def add_attribute(self, images: torch.Tensor, vector: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """decode(mu(images) + scale * vector): adds an attribute (scale < 0 subtracts it)."""
        if not isinstance(vector, torch.Tensor) or vector.shape != (self.config.latent_dim,):
            shape = tuple(vector.shape) if isinstance(vector, torch.Tensor) else type(vector).__name__
            raise ValueError(f"vector must be a tensor [{self.config.latent_dim}], got {shape}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        return self.decode(self.encode(images)[0] + scale * vector)

    def interpolate(self, x1: torch.Tensor, x2: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Decoded points on the line between the encodings (mu) of x1 and x2, both ends included.

        x1, x2: one image [C, S, S] each -> [steps, C, S, S]; or batches [N, C, S, S] -> [N, steps, C, S, S].
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps must be an int >= 2, got {steps!r}")
        if not isinstance(x1, torch.Tensor) or not isinstance(x2, torch.Tensor):
            raise TypeError("x1 and x2 must be tensors")
        if x1.shape != x2.shape:
            raise ValueError(f"x1 and x2 must have one shape, got {tuple(x1.shape)} and {tuple(x2.shape)}")
        single = x1.dim() == 3
        if single:
            x1, x2 = x1.unsqueeze(0), x2.unsqueeze(0)
        mu1, mu2 = self.encode(x1)[0], self.encode(x2)[0]  # (N, L)
        t = torch.linspace(0, 1, steps, device=mu1.device, dtype=mu1.dtype).view(1, steps, 1)
        z = (1 - t) * mu1.unsqueeze(1) + t * mu2.unsqueeze(1)  # (N, steps, L)
        images = self.decode(z.reshape(-1, self.config.latent_dim))
        images = images.view(x1.shape[0], steps, *images.shape[1:])
        return images[0] if single else images


def vae_loss(x: torch.Tensor, recon: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
             beta: float = 1.0) -> dict[str, torch.Tensor]:
    """{"recon": per-image sum of squared errors, "kl": per-image KL, "loss": recon + beta * kl}, each the mean
    over the batch, in fp32."""
    if not isinstance(x, torch.Tensor) or not isinstance(recon, torch.Tensor) or x.shape != recon.shape:
        raise ValueError(f"x and recon must be tensors of one shape, got {getattr(x, 'shape', x)!r} and "
                         f"{getattr(recon, 'shape', recon)!r}")
    recon_loss = (recon.float() - x.float()).square().flatten(1).sum(1).mean()
    kl = ops.gaussian_kl(mu, logvar, reduction="mean")
    return {"loss": recon_loss + beta * kl, "recon": recon_loss, "kl": kl}


__all__ = ["VAEConfig", "VAE", "vae_loss"]
