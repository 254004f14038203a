"""A time-conditioned UNet for diffusion (Ho et al. 2020), with optional class conditioning.

    cfg = UNetConfig.preset("32", num_classes=9)     # or "64", "tiny"
    unet = UNet(cfg)
    eps = unet(x_t, t, class_labels)                 # x_t [B, C, H, W], t [B] or a scalar, labels [B] or None

Layout: conv_in -> down levels (ResBlocks, self-attention at ``attention_resolutions``, a stride-2 conv
between levels) -> middle (ResBlock, attention, ResBlock) -> up levels (ResBlocks over the concatenated skip,
attention, then a stride-2 transposed convolution through genfast.ops.conv_transpose2d, or nearest + conv)
-> GroupNorm, SiLU, conv_out. Self-attention runs through genfast.ops.attention ([B, heads, H*W, head_dim]).

Class conditioning: ``num_classes > 0`` adds a label embedding with one extra row, the *null class*
(index ``num_classes``), to the time embedding. Training replaces labels by the null class with probability
``label_dropout`` (``drop_labels``); sampling with classifier-free guidance runs the null class as the
unconditional branch. ``class_labels=None`` on a class-conditional UNet means "unconditional" (null class).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genfast import ops
from genfast._io import check_fits_memory
from genfast.models._checkpoint import build_and_load, read_run
from genfast.models._config import ModelConfig
from genfast.nn.conv_transpose import ConvTranspose2d

UPSAMPLE_MODES = ("conv_transpose", "nearest")


@dataclass
class UNetConfig(ModelConfig):
    image_size: int = 32
    in_channels: int = 3
    out_channels: int | None = None  # None: in_channels (epsilon / v / sample prediction has the input's shape)
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)  # one entry per resolution level; each level but the last halves
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get a self-attention block
    attention_head_dim: int = 32
    num_groups: int = 32  # GroupNorm groups
    dropout: float = 0.0
    num_classes: int = 0  # 0: unconditional
    upsample: str = "conv_transpose"  # or "nearest" (nearest-neighbour x2 then a 3x3 conv)

    def __post_init__(self) -> None:
        self.channel_mults = tuple(self.channel_mults)
        self.attention_resolutions = tuple(self.attention_resolutions)
        if self.out_channels is None:
            self.out_channels = self.in_channels
        for name in ("image_size", "in_channels", "out_channels", "base_channels", "num_res_blocks",
                     "attention_head_dim", "num_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"UNetConfig: {name} must be a positive int, got {value!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"UNetConfig: num_classes must be an int >= 0, got {self.num_classes!r}")
        if not self.channel_mults or any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                                         for m in self.channel_mults):
            raise ValueError(f"UNetConfig: channel_mults must be a non-empty tuple of positive ints, "
                             f"got {self.channel_mults!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig: dropout must be in [0, 1), got {self.dropout!r}")
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"UNetConfig: upsample must be one of {', '.join(UPSAMPLE_MODES)}, got {self.upsample!r}")
        self.check_sample_size(self.image_size, "image_size")
        for level, mult in enumerate(self.channel_mults):
            channels = self.base_channels * mult
            if channels % self.num_groups:
                raise ValueError(f"UNetConfig: num_groups={self.num_groups} must divide every level's channels "
                                 f"(base_channels * mult = {channels})")
            # The middle block (at the last level) always attends; other levels where their size is listed.
            attends = level == len(self.channel_mults) - 1 or self.image_size // 2**level in self.attention_resolutions
            if attends and channels % self.attention_head_dim:
                raise ValueError(f"UNetConfig: attention_head_dim={self.attention_head_dim} must divide the "
                                 f"channels of each attention level ({channels})")

    @property
    def num_downsamples(self) -> int:
        return len(self.channel_mults) - 1

    def check_sample_size(self, size: int, name: str = "sample size") -> None:
        """ValueError unless ``size`` can be halved ``num_downsamples`` times exactly (the skips must line up).

        A method of the config, so that a sampler handed a UNet (genfast.diffusion.DiffusionPipeline, a layer
        below the models) checks a size by the model's own rule without importing genfast.models."""
        factor = 2**self.num_downsamples
        if isinstance(size, bool) or not isinstance(size, int) or size < factor or size % factor:
            raise ValueError(f"UNet: {name} {size!r} cannot be halved {self.num_downsamples} times "
                             f"(channel_mults={self.channel_mults}); it must be a positive multiple of {factor}")

    # from_dict, to_dict and preset ("32": 32x32, ~9M parameters; "64"; "tiny": 8x8, for tests) come from
    # ModelConfig; PRESETS is attached below, once defined.


PRESETS: dict[str, dict] = {
    "32": dict(image_size=32, base_channels=64, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
               attention_resolutions=(16,), attention_head_dim=32, num_groups=32),
    "64": dict(image_size=64, base_channels=64, channel_mults=(1, 2, 3, 4), num_res_blocks=2,
               attention_resolutions=(16, 8), attention_head_dim=32, num_groups=32),
    # For tests (the Triton interpreter runs it in seconds) and smoke runs: 8x8, two levels, ~50k parameters.
    "tiny": dict(image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                 attention_resolutions=(4,), attention_head_dim=8, num_groups=4),
}


# ---------------------------------------------------------------------------------------------- blocks
def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] (float32) of timesteps [B]: cos and sin of t at geometric frequencies."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the time embedding as a per-channel shift, then GroupNorm-SiLU-dropout-conv."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]  # temb is already SiLU'd by the UNet
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions of a feature map, residual, through genfast.ops.attention."""

    def __init__(self, channels: int, head_dim: int, groups: int):
        super().__init__()
        self.heads = channels // head_dim
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C), N = H*W
        q, k, v = self.qkv(tokens).view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = ops.attention(q, k, v)  # (B, heads, N, head_dim)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))  # (B, N, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """x2: a 4x4 stride-2 transposed convolution (genfast's kernel), or nearest-neighbour + 3x3 conv."""

    def __init__(self, channels: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode == "conv_transpose":
            self.conv = ConvTranspose2d(channels, channels, 4, stride=2, padding=1)
        else:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "nearest":
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


# ---------------------------------------------------------------------------------------------- UNet
class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"UNet: config must be a UNetConfig, got {type(config).__name__}")
        self.config = cfg = config
        ch = cfg.base_channels
        temb_dim = 4 * ch
        # At least 32 sinusoids: with fewer, the frequencies are too sparse to tell 1000 timesteps apart.
        self.time_dim = max(ch, 32)
        self.time_mlp = nn.Sequential(nn.Linear(self.time_dim, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        # One extra row: the null class, the "unconditional" label of classifier-free guidance.
        self.label_emb = nn.Embedding(cfg.num_classes + 1, temb_dim) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        def block(cin, cout, size):
            attn = AttentionBlock(cout, cfg.attention_head_dim, cfg.num_groups) if size in cfg.attention_resolutions \
                else None
            return nn.ModuleDict({"res": ResBlock(cin, cout, temb_dim, cfg.num_groups, cfg.dropout),
                                  **({"attn": attn} if attn is not None else {})})

        size = cfg.image_size
        skips = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mults):
            out = cfg.base_channels * mult
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(ch, out, size))
                ch = out
                skips.append(ch)
            if level != len(cfg.channel_mults) - 1:
                self.down.append(nn.ModuleDict({"down": Downsample(ch)}))
                size //= 2
                skips.append(ch)

        self.mid_res1 = ResBlock(ch, ch, temb_dim, cfg.num_groups, cfg.dropout)
        self.mid_attn = AttentionBlock(ch, cfg.attention_head_dim, cfg.num_groups)
        self.mid_res2 = ResBlock(ch, ch, temb_dim, cfg.num_groups, cfg.dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            out = cfg.base_channels * mult
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(block(ch + skips.pop(), out, size))
                ch = out
            if level != 0:
                self.up.append(nn.ModuleDict({"up": Upsample(ch, cfg.upsample)}))
                size *= 2

        self.norm_out = nn.GroupNorm(cfg.num_groups, ch)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)

    @property
    def null_class(self) -> int:
        """The label index of "no class" (classifier-free guidance's unconditional branch)."""
        if not self.config.num_classes:
            raise ValueError("UNet: this UNet is unconditional (num_classes=0): it has no null class")
        return self.config.num_classes

    def drop_labels(self, labels: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """``labels`` with each entry replaced by the null class with probability ``p`` (label dropout)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"UNet.drop_labels: p must be in [0, 1], got {p!r}")
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
        return torch.where(drop, torch.full_like(labels, self.null_class), labels)

    def _check(self, x, timesteps, class_labels) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != cfg.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"UNet: x must be [B, {cfg.in_channels}, H, W], got {shape}")
        cfg.check_sample_size(x.shape[2], "height")
        cfg.check_sample_size(x.shape[3], "width")
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"UNet: timesteps must be a scalar or [B={x.shape[0]}], got {tuple(timesteps.shape)}")
        if class_labels is not None:
            if not cfg.num_classes:
                raise ValueError("UNet: class_labels given but this UNet is unconditional (num_classes=0)")
            if (not isinstance(class_labels, torch.Tensor) or class_labels.shape != (x.shape[0],)
                    or class_labels.is_floating_point()):
                raise ValueError(f"UNet: class_labels must be an integer tensor [B={x.shape[0]}]")
        elif cfg.num_classes:
            class_labels = torch.full((x.shape[0],), cfg.num_classes, dtype=torch.int64, device=x.device)
        return timesteps, class_labels

    def forward(self, x: torch.Tensor, timesteps, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W] (H, W multiples of 2**num_downsamples); timesteps [B] or scalar; class_labels [B] of
        0..num_classes (num_classes = the null class) or None. Returns [B, out_channels, H, W]."""
        timesteps, class_labels = self._check(x, timesteps, class_labels)
        temb = self.time_mlp(timestep_embedding(timesteps, self.time_dim).to(x.dtype))
        if self.label_emb is not None:
            temb = temb + self.label_emb(class_labels)
        temb = F.silu(temb)  # every ResBlock applies its projection to SiLU(temb)

        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer["down"](h) if "down" in layer else self._block(layer, h, temb)
            skips.append(h)
        h = self.mid_res2(self.mid_attn(self.mid_res1(h, temb)), temb)
        for layer in self.up:
            h = layer["up"](h) if "up" in layer else self._block(layer, torch.cat([h, skips.pop()], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))

    @staticmethod
    def _block(layer: nn.ModuleDict, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = layer["res"](h, temb)
        return layer["attn"](h) if "attn" in layer else h

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu", *, ema: bool = True,
                        allow_nonfinite: bool = False) -> "UNet":
        """The UNet of a `genfast train ddpm` run folder (or its checkpoint folder), in eval mode: its EMA weights
        (what the recipe samples with), or the raw ones with ``ema=False``. The sampling schedule is in the run's
        config.json under "scheduler" (``genfast.models.load`` returns a ready DiffusionPipeline)."""
        directory, saved = read_run(path, "ddpm")
        config = UNetConfig.from_dict(saved["model"])
        # No weight bounds image_size (the convolutions fit any size; the attention levels it picks are checked
        # against the file): refuse one where a single image's first feature map cannot fit in memory.
        check_fits_memory(4 * config.base_channels * config.image_size**2,
                          f"{directory / 'config.json'}: model.image_size={config.image_size} (one image's "
                          f"{config.base_channels}-channel feature map)")
        return build_and_load(lambda: cls(config), directory, "ema" if ema else "model",
                              allow_nonfinite=allow_nonfinite).to(device).eval()


# ---------------------------------------------------------------------------------------------- training loss
PREDICTIONS = ("epsilon", "v_prediction")


def velocity(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The v-prediction target ``sqrt(a_t) * noise - sqrt(1 - a_t) * x0`` (Salimans & Ho 2022), float32."""
    a = scheduler.alphas_cumprod.to(x0.device)[timesteps].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()


def diffusion_loss(unet: nn.Module, scheduler, x0: torch.Tensor, labels: torch.Tensor | None,
                   generator: torch.Generator | None, *, prediction: str = "epsilon",
                   label_dropout: float = 0.0) -> torch.Tensor:
    """The mean squared error of one training batch x0 [B, C, H, W] (labels [B] or None).

    x_t = scheduler.add_noise(x0, noise, t) at a uniformly drawn timestep; the UNet predicts the noise
    (``epsilon``) or v (``v_prediction``). Noise, timesteps and label dropout come from ``generator`` (on x0's
    device), in that order. ``unet`` may be wrapped (DDP); label dropout needs the plain UNet's null class, found
    through ``.module``. The UNet runs under bf16 autocast on CUDA; the loss is taken in float32.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    plain = unet.module if isinstance(unet, nn.parallel.DistributedDataParallel) else unet
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = torch.randint(0, len(scheduler), (x0.shape[0],), generator=generator, device=x0.device)
    if labels is not None and label_dropout > 0:
        labels = plain.drop_labels(labels, label_dropout, generator=generator)
    x_t = scheduler.add_noise(x0, noise, t)
    target = noise if prediction == "epsilon" else velocity(scheduler, x0, noise, t)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=x0.device.type == "cuda"):
        pred = unet(x_t, t, labels)
    return F.mse_loss(pred.float(), target.float())


UNetConfig.PRESETS = PRESETS

__all__ = ["UNet", "UNetConfig", "PRESETS", "PREDICTIONS", "timestep_embedding", "velocity", "diffusion_loss"]
