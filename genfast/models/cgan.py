"""A class-conditional DCGAN (Mirza & Osindero, 2014, on the DCGAN architecture): the user picks the class.

Generator: the label's embedding [B, embed_dim] is concatenated to the latent z [B, nz], and the DCGAN generator
(genfast.nn.ConvTranspose2dNormAct blocks, Tanh fused in the last kernel) turns [B, nz + embed_dim, 1, 1] into
an image. Discriminator: the label's embedding is projected by a linear map to one image-sized plane and
concatenated to the image as an extra channel, then the DCGAN discriminator judges the pair; its logit also has a
projection term (Miyato & Koyama, 2018), the inner product of a second class embedding with the last features
summed over positions, which makes "is this image of this class" a direct term of the logit. With the plane
alone, 300 steps of a small model drew the wrong colour for its class in 29% of the samples; with both, in 0-1%.

Choosing the class: ``resolve_label(label, class_names)`` takes an index or a name ("red circle", "7") and raises
ValueError naming the known classes otherwise. ``interpolate(z0, z1, steps, mode)`` walks between two latents,
linearly or along the great circle (slerp, which keeps the norm of Gaussian latents typical).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import nn

from genfast.models._checkpoint import build_and_load, read_run
from genfast.models._config import ModelConfig, check_ints
from genfast.models.dcgan import (
    build_discriminator_layers,
    build_generator_layers,
    check_image_config,
    init_weights,
    latent,
)


@dataclass
class CGANConfig(ModelConfig):
    num_classes: int = 9
    image_size: int = 32  # 32 or 64
    channels: int = 3  # 1 or 3
    latent_dim: int = 100
    embed_dim: int = 50  # the label embedding's size
    g_features: int = 64
    d_features: int = 64
    class_names: tuple[str, ...] = ()  # optional names of the classes, index order

    def __post_init__(self):
        check_image_config(self)
        check_ints(self, ("num_classes", "embed_dim"))
        if not isinstance(self.class_names, (list, tuple)):
            raise ValueError(f"CGANConfig.class_names must be a list of names, got {self.class_names!r}")
        self.class_names = tuple(str(n) for n in self.class_names)
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"CGANConfig.class_names has {len(self.class_names)} names for "
                             f"{self.num_classes} classes")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("CGANConfig.class_names must be unique")


def resolve_label(label: int | str, class_names: tuple[str, ...] | list[str] = (), num_classes: int | None = None
                  ) -> int:
    """The class index of ``label``: an index in [0, num_classes), a class name, or an index written as text.

    Raises ValueError naming the known classes when the label is none of these.
    """
    names = tuple(class_names)
    count = num_classes if num_classes is not None else len(names)
    known = ", ".join(repr(n) for n in names) if names else f"indices 0..{count - 1}"
    if isinstance(label, str):
        if label in names:
            return names.index(label)
        text = label.strip()
        if text.lstrip("-").isdigit():
            label = int(text)
        else:
            raise ValueError(f"unknown class label {label!r}; known: {known}")
    if isinstance(label, bool) or not isinstance(label, numbers.Integral):
        raise TypeError(f"label must be a class index (int) or a class name (str), got {type(label).__name__}")
    if not 0 <= int(label) < count:
        raise ValueError(f"class index {int(label)} is out of range; known: {known}")
    return int(label)


def interpolate(z0: torch.Tensor, z1: torch.Tensor, steps: int, mode: str = "slerp") -> torch.Tensor:
    """``steps`` latents from z0 to z1 (both ends included): [steps, *z0.shape].

    mode "linear": (1 - t) z0 + t z1. mode "slerp": spherical interpolation along the great circle between the
    two directions, with the norm interpolated linearly (for nearly parallel latents it is linear).
    """
    if not isinstance(z0, torch.Tensor) or not isinstance(z1, torch.Tensor) or z0.shape != z1.shape:
        raise ValueError("z0 and z1 must be tensors of the same shape")
    if z0.dim() not in (1, 2) or z0.numel() == 0:
        raise ValueError(f"z0 must be [D] or [B, D], got shape {tuple(z0.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an int >= 2, got {steps!r}")
    if mode not in ("linear", "slerp"):
        raise ValueError(f"mode must be 'linear' or 'slerp', got {mode!r}")
    t = torch.linspace(0, 1, steps, dtype=torch.float64, device=z0.device).view(steps, *([1] * z0.dim()))
    a, b = z0.double(), z1.double()
    if mode == "linear":
        return ((1 - t) * a + t * b).to(z0.dtype)
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua, ub = a / na.clamp_min(1e-12), b / nb.clamp_min(1e-12)
    omega = torch.arccos((ua * ub).sum(-1, keepdim=True).clamp(-1, 1))
    sin = torch.sin(omega)
    parallel = sin.abs() < 1e-6
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / safe
    direction = torch.where(parallel, (1 - t) * ua + t * ub, direction)
    return (direction * ((1 - t) * na + t * nb)).to(z0.dtype)


def _check_labels(labels: torch.Tensor, batch: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (batch,):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be int64 [{batch}], got {shape}")


class Generator(nn.Module):
    """(z [B, latent_dim], labels int64 [B]) -> images [B, channels, image_size, image_size] in [-1, 1]."""

    def __init__(self, config: CGANConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.num_classes, c.embed_dim)
        self.net = build_generator_layers(c.latent_dim + c.embed_dim, c.image_size, c.channels, c.g_features)
        init_weights(self.net)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"z must be [B, {self.config.latent_dim}], got shape {tuple(z.shape)}")
        _check_labels(labels, z.shape[0])
        h = torch.cat([z, self.embed(labels).to(z.dtype)], dim=1)  # (B, nz + E)
        return self.net(h[:, :, None, None])  # (B, C, S, S)

    def latent(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return latent(batch, self.config.latent_dim, generator, device or next(self.parameters()).device)

    def label_index(self, label: int | str) -> int:
        return resolve_label(label, self.config.class_names, self.config.num_classes)

    @torch.no_grad()
    def generate(self, label: int | str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images of one class, chosen by index or name."""
        index = self.label_index(label)
        z = self.latent(n, generator)
        return self(z, torch.full((n,), index, dtype=torch.int64, device=z.device))

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu", *,
                        allow_nonfinite: bool = False) -> "Generator":
        """The generator of a `genfast train cgan` run folder (or its checkpoint folder), in eval mode."""
        directory, saved = read_run(path, "cgan")
        config = CGANConfig.from_dict(saved["model"])
        return build_and_load(lambda: cls(config), directory, "generator",
                              allow_nonfinite=allow_nonfinite).to(device).eval()


class Discriminator(nn.Module):
    """(images [B, channels, S, S], labels int64 [B]) -> real/fake logits [B]."""

    def __init__(self, config: CGANConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.num_classes, c.embed_dim)
        self.project = nn.Linear(c.embed_dim, c.image_size * c.image_size)  # the label as one image plane
        self.net = build_discriminator_layers(c.channels + 1, c.image_size, c.d_features)
        init_weights(self.net)
        init_weights(self.project)
        # The projection term's class embedding, one vector per class as wide as the last features.
        self.class_projection = nn.Embedding(c.num_classes, self.net[-1].in_channels)
        nn.init.normal_(self.class_projection.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        c = self.config
        if images.dim() != 4 or images.shape[1:] != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"images must be [B, {c.channels}, {c.image_size}, {c.image_size}], got shape "
                             f"{tuple(images.shape)}")
        _check_labels(labels, images.shape[0])
        plane = self.project(self.embed(labels)).view(-1, 1, c.image_size, c.image_size).to(images.dtype)
        features = self.net[:-1](torch.cat([images, plane], dim=1))  # (B, W, 4, 4)
        pooled = features.sum(dim=(2, 3))  # (B, W)
        projection = (self.class_projection(labels).to(pooled.dtype) * pooled).sum(dim=1)  # (B,)
        return self.net[-1](features).flatten() + projection  # (B,)


__all__ = ["CGANConfig", "Generator", "Discriminator", "resolve_label", "interpolate"]
