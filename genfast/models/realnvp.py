"""RealNVP (Dinh, Sohl-Dickstein & Bengio, 2017, "Density estimation using Real NVP"): a normalizing flow with an
exact likelihood.

    flow = RealNVP(RealNVPConfig(kind="vector", dim=2))             # 2-D points (two moons, rings)
    flow = RealNVP(RealNVPConfig(kind="image", image_size=16))      # digits; x in [0, 1] (dequantized)
    log_p = flow.log_prob(x)            # [N] nats, exact: log N(z; 0, I) + log |det dz/dx|
    z, log_det = flow(x)                # z [N, D] (D = the data's size), log_det [N]
    x = flow.inverse(z)                 # exact inverse of forward
    x = flow.sample(64, temperature=0.8, generator=g)

The flow is a stack of invertible layers, each with a cheap exact log-determinant:
- affine coupling: with a fixed 0/1 mask b over the data's dimensions, (s, t) = net(b * x) * (1 - b) and
  y = x * exp(s) + t, so the masked half passes unchanged (s = t = 0 there) and log|det| = sum(s). The mask is a
  checkerboard (alternating parity) over pixels, or the first / second half of the channels; for vectors it
  alternates over the coordinates. s = scale * tanh(raw), a learned per-dimension scale, keeps exp(s) bounded;
- actnorm (Kingma & Dhariwal, 2018): per-channel y = (x + bias) * exp(log_scale), initialised from the first
  training batch to zero mean and unit variance; log|det| = H * W * sum(log_scale);
- for images, the multi-scale architecture: at each scale 3 checkerboard couplings, a squeeze
  (C, H, W) -> (4C, H/2, W/2), 3 channel-wise couplings, then half the channels leave as part of z and the rest go
  on to the next scale; the last scale has 4 checkerboard couplings.
Images are modelled in logit space: a dequantized x in [0, 1] (``dequantize``) maps to
y = logit(a + (1 - 2a) x) with a = 0.05, whose log-determinant enters ``log_prob``; ``sample`` and ``inverse``
return images in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from genfast.models._checkpoint import build_and_load, read_run
from genfast.models._config import ModelConfig, check_choice, check_int

ALPHA = 0.05  # the logit transform's margin: x in [0, 1] -> logit(ALPHA + (1 - 2 ALPHA) x)
IMAGE_SIZES = (8, 16, 32)


@dataclass
class RealNVPConfig(ModelConfig):
    kind: str = "vector"     # "vector" (points [N, dim]) or "image" ([N, channels, image_size, image_size])
    dim: int = 2             # vector: the points' dimension (>= 2)
    image_size: int = 16     # image: 8, 16 or 32
    channels: int = 1        # image: 1 or 3
    hidden: int = 64         # width of the coupling networks (MLP units, or convolution channels)
    couplings: int = 8       # vector: coupling layers
    scales: int = 2          # image: scales of the multi-scale architecture
    levels: int = 256        # image: the discrete values per channel that dequantization spreads over [0, 1]

    def __post_init__(self) -> None:
        check_choice(self, "kind", ("vector", "image"))
        check_int(self, "dim", minimum=2, maximum=4096)
        check_choice(self, "image_size", IMAGE_SIZES)
        check_choice(self, "channels", (1, 3))
        check_int(self, "hidden", maximum=2048)
        check_int(self, "couplings", minimum=2, maximum=64)
        check_int(self, "scales", maximum=4)
        check_int(self, "levels", minimum=2, maximum=65536)
        if self.kind == "image" and self.image_size >> self.scales < 2:
            raise ValueError(f"RealNVPConfig.scales: {self.scales} squeezes of a {self.image_size}x"
                             f"{self.image_size} image leave less than 2x2 pixels")

    @property
    def data_shape(self) -> tuple[int, ...]:
        return (self.dim,) if self.kind == "vector" else (self.channels, self.image_size, self.image_size)

    @property
    def data_dim(self) -> int:
        return math.prod(self.data_shape)


# ------------------------------------------------------------------------------------------------- layers
def affine(x: torch.Tensor, s: torch.Tensor, t: torch.Tensor, *, inverse: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine coupling's transform: (x * exp(s) + t, sum(s)) per sample, or with ``inverse``
    ((x - t) * exp(-s), -sum(s)). x, s, t [N, ...]; the log-det is [N], summed in fp32 (fp64 for fp64 input)."""
    log_det = s.to(torch.promote_types(s.dtype, torch.float32)).flatten(1).sum(1)
    if inverse:
        return (x - t) * torch.exp(-s), -log_det
    return x * torch.exp(s) + t, log_det


class ActNorm(nn.Module):
    """Per-channel (dim 1) affine y = (x + bias) * exp(log_scale), initialised from the first training batch."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))  # saved: a loaded flow is never re-initialised

    def _view(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return p.view(1, -1, *([1] * (x.dim() - 2)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialized):
            with torch.no_grad():
                dims = [d for d in range(x.dim()) if d != 1]
                mean, std = x.mean(dims), x.std(dims) if x.shape[0] > 1 else torch.ones_like(self.bias)
                self.bias.copy_(-mean)
                self.log_scale.copy_(-torch.log(std.clamp_min(1e-6)))
                self.initialized.fill_(True)
        per_position = math.prod(x.shape[2:])
        wide = torch.promote_types(x.dtype, torch.float32)
        log_det = (self.log_scale.to(wide).sum() * per_position).expand(x.shape[0])
        return (x + self._view(self.bias, x)) * torch.exp(self._view(self.log_scale, x)), log_det

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.exp(-self._view(self.log_scale, y)) - self._view(self.bias, y)


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    last = nn.Linear(hidden, 2 * dim)
    nn.init.zeros_(last.weight)  # every coupling starts as the identity
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), last)


def _convnet(channels: int, hidden: int) -> nn.Sequential:
    last = nn.Conv2d(hidden, 2 * channels, 3, padding=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1),
                         nn.ReLU(), last)


class AffineCoupling(nn.Module):
    """y = x * exp(s) + t with (s, t) = net(mask * x) zeroed where mask is 1: those dimensions pass unchanged and
    condition the others. mask: [D] (vectors) or [C, H, W] (images)."""

    def __init__(self, mask: torch.Tensor, net: nn.Module):
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)  # rebuilt from the config, never read from a file
        self.net = net
        self.scale = nn.Parameter(torch.ones(mask.shape[0]))

    def _shift_scale(self, x_kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw_s, t = self.net(x_kept).chunk(2, dim=1)
        free = 1 - self.mask
        scale = self.scale.view(1, -1, *([1] * (x_kept.dim() - 2)))
        return scale * torch.tanh(raw_s) * free, t * free

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self._shift_scale(x * self.mask)
        return affine(x, s, t)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        s, t = self._shift_scale(y * self.mask)  # the kept dimensions are the same in y as in x
        return affine(y, s, t, inverse=True)[0]


def checkerboard(shape: tuple[int, ...], parity: int) -> torch.Tensor:
    """[C, H, W] (or [D]) 0/1 mask: 1 where the sum of the spatial (or the coordinate) indices has ``parity``."""
    if len(shape) == 1:
        return (torch.arange(shape[0]) % 2 == parity).float()
    c, h, w = shape
    board = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 == parity
    return board.float().expand(c, h, w).contiguous()


def channel_mask(shape: tuple[int, int, int], first_half: bool) -> torch.Tensor:
    c, h, w = shape
    mask = torch.zeros(c, h, w)
    mask[:c // 2] = 1
    return mask if first_half else 1 - mask


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] -> [N, 4C, H/2, W/2]: each 2x2 block becomes 4 channels."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(n, 4 * c, h // 2, w // 2)


def unsqueeze(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c // 4, 2 * h, 2 * w)


class _Squeeze(nn.Module):
    pass


class _Split(nn.Module):
    """Half the channels leave the flow here as part of z."""


# --------------------------------------------------------------------------------------------------- flow
class RealNVP(nn.Module):
    def __init__(self, config: RealNVPConfig | None = None):
        super().__init__()
        self.config = cfg = config or RealNVPConfig()
        layers: list[nn.Module] = []
        if cfg.kind == "vector":
            for i in range(cfg.couplings):
                layers += [ActNorm(cfg.dim), AffineCoupling(checkerboard((cfg.dim,), i % 2), _mlp(cfg.dim, cfg.hidden))]
        else:
            shape = cfg.data_shape
            for scale in range(cfg.scales + 1):
                last = scale == cfg.scales
                for i in range(4 if last else 3):
                    layers += [ActNorm(shape[0]), AffineCoupling(checkerboard(shape, i % 2),
                                                                 _convnet(shape[0], cfg.hidden))]
                if last:
                    break
                layers.append(_Squeeze())
                shape = (shape[0] * 4, shape[1] // 2, shape[2] // 2)
                for i in range(3):
                    layers += [ActNorm(shape[0]), AffineCoupling(channel_mask(shape, i % 2 == 0),
                                                                 _convnet(shape[0], cfg.hidden))]
                layers.append(_Split())
                shape = (shape[0] // 2, shape[1], shape[2])
        self.layers = nn.ModuleList(layers)

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu", *,
                        allow_nonfinite: bool = False) -> "RealNVP":
        """The flow of a `genfast train realnvp` run folder (or its checkpoint folder), in eval mode."""
        directory, saved = read_run(path, "realnvp")
        config = RealNVPConfig.from_dict(saved["model"])
        return build_and_load(lambda: cls(config), directory, "model",
                              allow_nonfinite=allow_nonfinite).to(device).eval()

    # --------------------------------------------------------------------------------------------- checks
    def _check(self, name: str, x, shape: tuple[int, ...]) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor [N, {', '.join(map(str, shape))}], got {type(x).__name__}")
        if tuple(x.shape[1:]) != shape or x.shape[0] == 0:
            raise ValueError(f"{name} must be [N, {', '.join(map(str, shape))}] with N >= 1 for this flow, got "
                             f"shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")

    # --------------------------------------------------------------------------------------------- flow
    def _to_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [0, 1] -> (logit space, log|det| [N]); vectors unchanged."""
        if self.config.kind == "vector":
            return x, x.new_zeros(x.shape[0], dtype=torch.promote_types(x.dtype, torch.float32))
        p = ALPHA + (1 - 2 * ALPHA) * x
        y = torch.log(p) - torch.log1p(-p)
        log_det = (math.log(1 - 2 * ALPHA) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
        log_det = log_det.to(torch.promote_types(x.dtype, torch.float32))
        return y, log_det

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, *data_shape] (images in [0, 1]) -> (z [N, D], log|det dz/dx| [N], fp32 or fp64)."""
        self._check("x", x, self.config.data_shape)
        h, log_det = self._to_logits(x)
        out: list[torch.Tensor] = []
        for layer in self.layers:
            if isinstance(layer, _Squeeze):
                h = squeeze(h)
            elif isinstance(layer, _Split):
                leave, h = h.chunk(2, dim=1)
                out.append(leave.flatten(1))
            else:
                h, layer_log_det = layer(h)
                log_det = log_det + layer_log_det
        out.append(h.flatten(1))
        return torch.cat(out, 1), log_det

    def _part_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of the pieces of z, in the order forward concatenates them."""
        cfg = self.config
        if cfg.kind == "vector":
            return [(cfg.dim,)]
        shapes, (c, s) = [], (cfg.channels, cfg.image_size)
        for _ in range(cfg.scales):
            c, s = c * 2, s // 2  # squeeze (4C, S/2), then half the channels leave
            shapes.append((c, s, s))
        return shapes + [(c, s, s)]

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, D] -> x [N, *data_shape] (images in [0, 1]): the exact inverse of forward."""
        self._check("z", z, (self.config.data_dim,))
        shapes = self._part_shapes()
        parts = list(z.split([math.prod(s) for s in shapes], dim=1))
        h = parts.pop().view(z.shape[0], *shapes[-1])
        for layer in reversed(self.layers):
            if isinstance(layer, _Squeeze):
                h = unsqueeze(h)
            elif isinstance(layer, _Split):
                h = torch.cat([parts.pop().view_as(h), h], 1)
            else:
                h = layer.inverse(h)
        if self.config.kind == "image":
            h = (torch.sigmoid(h) - ALPHA) / (1 - 2 * ALPHA)
        return h

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) [N] in nats (fp32, fp64 for fp64 x): the density of x (images: of the dequantized x in [0, 1]^D)."""
        z, log_det = self(x)
        z = z.to(log_det.dtype)
        return -0.5 * (z.square().sum(1) + z.shape[1] * math.log(2 * math.pi)) + log_det

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[N]: -log2 p per dimension. Images: of the discrete values (``levels`` bins per channel, each 1/levels
        wide in [0, 1], so a density in [0, 1] counts log2(levels) bits more); vectors: of the density."""
        bits = -self.log_prob(x) / (self.config.data_dim * math.log(2))
        return bits + math.log2(self.config.levels) if self.config.kind == "image" else bits

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws [n, *data_shape]: inverse(z) for z ~ N(0, temperature^2 I); images clamped to [0, 1] (the logit
        transform's inverse reaches ALPHA / (1 - 2 ALPHA) beyond either end)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                0 <= temperature < math.inf):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        param = next(self.parameters())
        draw_on = generator.device if generator is not None else param.device
        z = torch.randn(n, self.config.data_dim, generator=generator, device=draw_on) * temperature
        x = self.inverse(z.to(device=param.device, dtype=param.dtype))
        return x.clamp(0, 1) if self.config.kind == "image" else x


def dequantize(images: torch.Tensor, levels: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [-1, 1] -> their ``levels`` discrete values spread uniformly over their bins: (q + u) / levels in
    [0, 1], q = round((x + 1) / 2 * (levels - 1)), u ~ U[0, 1)."""
    q = ((images.float().clamp(-1, 1) + 1) * ((levels - 1) / 2)).round()
    u = torch.rand(q.shape, generator=generator, device=q.device)
    return (q + u) / levels


def gaussian_bits_per_dim(train: torch.Tensor, held_out: torch.Tensor, levels: int) -> float:
    """The per-pixel Gaussian baseline on dequantized images in [0, 1]: an independent Gaussian per dimension,
    its mean and variance from ``train``; mean bits per dimension of ``held_out``'s discrete values."""
    flat_train, flat_test = train.flatten(1).double(), held_out.flatten(1).double()
    mean, var = flat_train.mean(0), flat_train.var(0).clamp_min(1e-12)
    nats = 0.5 * ((flat_test - mean).square() / var + torch.log(2 * math.pi * var))
    return float(nats.mean() / math.log(2) + math.log2(levels))


__all__ = ["RealNVPConfig", "RealNVP", "ActNorm", "AffineCoupling", "affine", "dequantize", "gaussian_bits_per_dim",
           "squeeze", "unsqueeze"]
