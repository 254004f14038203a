"""Gated PixelCNN (van den Oord et al., 2016, "Conditional Image Generation with PixelCNN Decoders").

    model = PixelCNN(PixelCNNConfig(image_size=16, channels=1, levels=16))
    loss = model.loss(q)                               # q: int64 levels [N, C, S, S]; mean nats per dimension
    bpd = model.bits_per_dim(q)                        # [N]
    q = model.sample(64, generator=g, temperature=1.0, top_k=0)   # int64 [64, C, S, S]

p(x) = prod over pixels in raster order, and within a pixel over the channels R, then G, then B, of a categorical
over ``levels`` values. Two stacks of masked convolutions see only what comes before:
- the vertical stack: (k x k) kernels whose rows below the centre are zero; the first layer's centre row is zero
  too, so its features at row i depend on image rows < i only, whatever the depth;
- the horizontal stack: (1 x k) kernels over the current row, left of the centre and the centre itself, where the
  centre tap is masked by channel group (type A in the first layer: group g sees the input's groups < g; type B
  after: groups <= g). It adds the vertical stack's features through a 1x1 convolution at each layer, so the union
  of the two is the whole causal past: no blind spot.
Each layer gates its features, tanh(a) * sigmoid(b); with ``num_classes`` each gate gets a learned per-class bias.
Feature channel j belongs to colour group ``j % channels`` everywhere (so the gates' halves stay aligned), and
every 1x1 convolution of the horizontal stack and the head is masked type B by group.

Sampling draws every (row, column, channel) through ``genfast.ops.sample_tokens`` (temperature, top-k) and does not
recompute what it has: the vertical stack's features of row i depend only on rows < i, so they are computed once
per row, one row per layer from the cached rows above it (as in Fast PixelCNN++); each pixel then runs only the
horizontal stack, on the strip of columns that reach it (``receptive_rows`` to its left). ``sample(...,
cache=False)`` is the naive loop (the whole image through the whole network for every draw); both give the same
samples for the same generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genfast import ops
from genfast.models._checkpoint import build_and_load, read_run
from genfast.models._config import ModelConfig, check_choice, check_int

IMAGE_SIZES = (8, 16, 32)


@dataclass
class PixelCNNConfig(ModelConfig):
    image_size: int = 16     # 8, 16 or 32
    channels: int = 1        # 1 (grayscale) or 3 (RGB, sampled R then G then B within a pixel)
    levels: int = 16         # values per channel (the categorical's size), 2..256
    hidden: int = 36         # feature channels of each stack; a multiple of ``channels``
    layers: int = 5          # gated layers
    kernel_size: int = 3     # odd: the stacks' kernel width
    num_classes: int = 0     # > 0: class-conditional (a label per image)

    def __post_init__(self) -> None:
        check_choice(self, "image_size", IMAGE_SIZES)
        check_choice(self, "channels", (1, 3))
        check_int(self, "levels", minimum=2, maximum=256)
        check_int(self, "hidden", maximum=1024)
        check_int(self, "layers", maximum=64)
        check_int(self, "kernel_size", minimum=3, maximum=15)
        check_int(self, "num_classes", minimum=0, maximum=10_000)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"PixelCNNConfig.kernel_size must be odd, got {self.kernel_size}")
        if self.hidden % self.channels:
            raise ValueError(f"PixelCNNConfig.hidden must be a multiple of channels ({self.channels}), "
                             f"got {self.hidden}")

    @property
    def receptive_rows(self) -> int:
        """Rows above a pixel that its logits can depend on (and columns to its left, in its own row)."""
        return self.layers * (self.kernel_size // 2)


def _group_mask(out_ch: int, in_ch: int, groups: int, strict: bool) -> torch.Tensor:
    """[out, in] 0/1: output channel o may read input channel i at the current pixel iff group(i) < group(o)
    (strict: mask A) or <= (mask B), where group(j) = j % groups."""
    g_out = torch.arange(out_ch).remainder(groups)[:, None]
    g_in = torch.arange(in_ch).remainder(groups)[None, :]
    return (g_in < g_out if strict else g_in <= g_out).float()


class MaskedConv2d(nn.Conv2d):
    """A convolution whose weight is multiplied by a fixed 0/1 mask [out, in, kh, kw] (a buffer) at every call."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int], padding: tuple[int, int],
                 mask: torch.Tensor):
        super().__init__(in_ch, out_ch, kernel, padding=padding)
        self.register_buffer("mask", mask, persistent=False)  # rebuilt from the config: never read from a file

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)

    def last_row(self, rows: torch.Tensor) -> torch.Tensor:
        """The output row whose kernel window is ``rows`` (exactly kernel-height rows, the padding above already
        in them): [N, in, kh, W] -> [N, out, 1, W], the same numbers forward() gives at that row."""
        return F.conv2d(rows, self.weight * self.mask, self.bias, padding=(0, self.padding[1]))


def vertical_conv(in_ch: int, out_ch: int, k: int, first: bool) -> MaskedConv2d:
    """(k x k), rows above the centre, and the centre row unless ``first``: row i sees rows <= i (< i if first)."""
    mask = torch.zeros(out_ch, in_ch, k, k)
    mask[:, :, :k // 2 + (0 if first else 1)] = 1
    return MaskedConv2d(in_ch, out_ch, (k, k), (k // 2, k // 2), mask)


def horizontal_conv(in_ch: int, out_ch: int, k: int, first: bool, groups: int) -> MaskedConv2d:
    """(1 x k): columns left of the centre, and the centre masked by colour group (A if ``first``, else B)."""
    mask = torch.zeros(out_ch, in_ch, 1, k)
    mask[:, :, 0, :k // 2] = 1
    mask[:, :, 0, k // 2] = _group_mask(out_ch, in_ch, groups, strict=first)
    return MaskedConv2d(in_ch, out_ch, (1, k), (0, k // 2), mask)


def pointwise_conv(in_ch: int, out_ch: int, groups: int) -> MaskedConv2d:
    """1x1, masked type B by colour group: output group g reads input groups <= g."""
    mask = _group_mask(out_ch, in_ch, groups, strict=False)[..., None, None]
    return MaskedConv2d(in_ch, out_ch, (1, 1), (0, 0), mask)


def _gate(a: torch.Tensor) -> torch.Tensor:
    tanh_half, sigmoid_half = a.chunk(2, dim=1)
    return torch.tanh(tanh_half) * torch.sigmoid(sigmoid_half)


class GatedLayer(nn.Module):
    """One layer of both stacks. v: [N, F_in, H, W] -> [N, F, H, W]; h likewise, residual after the first layer."""

    def __init__(self, in_ch: int, hidden: int, k: int, groups: int, first: bool, num_classes: int):
        super().__init__()
        self.first = first
        self.v_conv = vertical_conv(in_ch, 2 * hidden, k, first)
        self.h_conv = horizontal_conv(in_ch, 2 * hidden, k, first, groups)
        # v at row i holds rows < i only, so it may feed every group of h unmasked
        self.v_to_h = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        self.h_out = pointwise_conv(hidden, hidden, groups)
        self.class_bias = nn.Embedding(num_classes, 2 * hidden) if num_classes else None

    def vertical(self, v: torch.Tensor, bias: torch.Tensor | None, *,
                 last_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(the next layer's v, this layer's contribution to h) from v [N, F_in, H, W]; with ``last_row`` v holds
        exactly the k rows of one output row's window and both results are that row, [N, ., 1, W]."""
        a = self.v_conv.last_row(v) if last_row else self.v_conv(v)  # (N, 2F, H, W)
        return _gate(a if bias is None else a + bias), self.v_to_h(a)

    def horizontal(self, h: torch.Tensor, from_v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        a = self.h_conv(h) + from_v  # (N, 2F, H, W)
        out = self.h_out(_gate(a if bias is None else a + bias))
        return out if self.first else h + out

    def bias(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        if self.class_bias is None:
            return None
        return self.class_bias(labels)[:, :, None, None]  # (N, 2F, 1, 1)


class PixelCNN(nn.Module):
    def __init__(self, config: PixelCNNConfig | None = None):
        super().__init__()
        self.config = cfg = config or PixelCNNConfig()
        c, k = cfg.channels, cfg.kernel_size
        self.layers = nn.ModuleList(
            GatedLayer(c if i == 0 else cfg.hidden, cfg.hidden, k, c, i == 0, cfg.num_classes)
            for i in range(cfg.layers))
        # logits channel j = level * C + colour: group j % C is the colour it predicts
        self.head = nn.Sequential(nn.ReLU(), pointwise_conv(cfg.hidden, cfg.hidden, c), nn.ReLU(),
                                  pointwise_conv(cfg.hidden, cfg.levels * c, c))

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu", *,
                        allow_nonfinite: bool = False) -> "PixelCNN":
        """The PixelCNN of a `genfast train pixelcnn` run folder (or its checkpoint folder), in eval mode."""
        directory, saved = read_run(path, "pixelcnn")
        config = PixelCNNConfig.from_dict(saved["model"])
        return build_and_load(lambda: cls(config), directory, "model",
                              allow_nonfinite=allow_nonfinite).to(device).eval()

    # --------------------------------------------------------------------------------------------- checks
    def _check_levels(self, q) -> None:
        cfg = self.config
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a tensor [N, C, S, S] of levels, got {type(q).__name__}")
        expected = (cfg.channels, cfg.image_size, cfg.image_size)
        if q.dim() != 4 or tuple(q.shape[1:]) != expected or q.shape[0] == 0:
            raise ValueError(f"q must be [N, {', '.join(map(str, expected))}] with N >= 1 for this PixelCNN, got "
                             f"shape {tuple(q.shape)}")
        if q.dtype != torch.int64:
            raise TypeError(f"q must be int64 levels in [0, {cfg.levels}), got {q.dtype}")
        if q.numel() and (int(q.min()) < 0 or int(q.max()) >= cfg.levels):
            raise ValueError(f"q must hold levels in [0, {cfg.levels}), got values in [{int(q.min())}, "
                             f"{int(q.max())}]")

    def _check_labels(self, labels, n: int, device: torch.device) -> torch.Tensor | None:
        cfg = self.config
        if not cfg.num_classes:
            if labels is not None:
                raise ValueError("labels given, but this PixelCNN is not class-conditional (num_classes=0)")
            return None
        if labels is None:
            raise ValueError(f"labels are needed: this PixelCNN is conditioned on {cfg.num_classes} classes")
        if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.shape != (n,):
            raise ValueError(f"labels must be an int64 tensor [{n}], got "
                             f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}")
        if int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes:
            raise ValueError(f"labels must be in [0, {cfg.num_classes}), got values in [{int(labels.min())}, "
                             f"{int(labels.max())}]")
        return labels.to(device)

    # --------------------------------------------------------------------------------------------- model
    def to_input(self, q: torch.Tensor) -> torch.Tensor:
        """Levels [N, C, H, W] -> the network's input in [-1, 1], in the parameters' dtype."""
        dtype = self.head[-1].weight.dtype
        return q.to(dtype) * (2.0 / (self.config.levels - 1)) - 1.0

    def _logits(self, x: torch.Tensor, biases: list) -> torch.Tensor:
        """x [N, C, H, W] (network input) -> logits [N, levels, C, H, W]."""
        v = h = x
        for layer, bias in zip(self.layers, biases):
            v, from_v = layer.vertical(v, bias)
            h = layer.horizontal(h, from_v, bias)
        out = self.head(h)  # (N, levels * C, H, W)
        n, _, height, width = out.shape
        return out.view(n, self.config.levels, self.config.channels, height, width)

    def forward(self, q: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Levels q [N, C, S, S] (int64) -> logits [N, levels, C, S, S] of each value given everything before it."""
        self._check_levels(q)
        labels = self._check_labels(labels, q.shape[0], q.device)
        return self._logits(self.to_input(q), [layer.bias(labels) for layer in self.layers])

    def loss(self, q: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean cross-entropy in nats per dimension (fp32)."""
        return F.cross_entropy(self(q, labels).float(), q)

    @torch.no_grad()
    def bits_per_dim(self, q: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """-log2 p(q) / (C * S * S) for each image: [N]."""
        nats = F.cross_entropy(self(q, labels).float(), q, reduction="none").flatten(1).mean(1)
        return nats / math.log(2)

    # --------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, n: int, *, labels: torch.Tensor | None = None, temperature: float = 1.0, top_k: int = 0,
               generator: torch.Generator | None = None, cache: bool = True) -> torch.Tensor:
        """n images of levels, int64 [n, C, S, S], each value drawn by ``genfast.ops.sample_tokens``.

        cache=True computes each row's vertical features once and each pixel's horizontal stack on the columns
        that reach it; cache=False reruns the whole network on the whole image for every draw (the baseline).
        ``generator`` (on the model's device) makes the draws repeatable: the two give the same images for one.
        """
        cfg = self.config
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        param = self.head[-1].weight
        labels = self._check_labels(labels, n, param.device)
        biases = [layer.bias(labels) for layer in self.layers]
        size, c = cfg.image_size, cfg.channels
        # The network's input, filled in as values are drawn; not-yet-drawn values stay 0 (never read).
        x = torch.zeros(n, c, size, size, device=param.device, dtype=param.dtype)
        q = torch.zeros(n, c, size, size, device=param.device, dtype=torch.int64)
        reach, pad = cfg.receptive_rows, cfg.kernel_size // 2
        # The vertical stack's cache: each layer's input, every row computed so far, between ``pad`` zero rows above
        # and below (the convolution's padding). Row i of a layer reads its input's rows <= i only (the kernel's
        # rows below the centre are masked, and the first layer's centre row too), so one row is computed per layer
        # per image row, from rows already there.
        v_inputs = [torch.zeros(n, layer.v_conv.in_channels, size + 2 * pad, size, device=x.device, dtype=x.dtype)
                    for layer in self.layers] if cache else []
        for i in range(size):
            if cache:
                from_v = self._vertical_row(v_inputs, i, biases)  # each (n, 2F, 1, S)
            for j in range(size):
                for ch in range(c):
                    if cache:
                        left = max(0, j - reach)
                        strip = [f[..., left:j + 1] for f in from_v]
                        logits = self._strip_logits(x[:, :, i:i + 1, left:j + 1], strip, biases)
                    else:
                        logits = self._logits(x, biases)[:, :, :, i, j]  # (n, levels, C)
                    level = ops.sample_tokens(logits[:, :, ch].float(), temperature=temperature, top_k=top_k,
                                              generator=generator)
                    q[:, ch, i, j] = level
                    x[:, ch, i, j] = level.to(x.dtype) * (2.0 / (cfg.levels - 1)) - 1.0
            if cache:
                v_inputs[0][:, :, pad + i] = x[:, :, i]  # the drawn row, for the rows below it
        return q

    def _vertical_row(self, v_inputs: list[torch.Tensor], i: int, biases: list) -> list[torch.Tensor]:
        """Row i of the vertical stack from the cached rows: each layer's contribution to h at row i ([n, 2F, 1, S]);
        each layer's output row is stored as the next layer's input. Buffer rows i..i+k-1 are image rows
        i-k//2..i+k//2, the kernel's window at row i."""
        out = []
        k = self.config.kernel_size
        for index, (layer, bias) in enumerate(zip(self.layers, biases)):
            v, from_v = layer.vertical(v_inputs[index][:, :, i:i + k], bias, last_row=True)
            if index + 1 < len(self.layers):
                v_inputs[index + 1][:, :, k // 2 + i] = v[:, :, 0]
            out.append(from_v)
        return out

    def _strip_logits(self, strip: torch.Tensor, from_v: list[torch.Tensor], biases: list) -> torch.Tensor:
        """The horizontal stack on one row's columns [j - receptive_rows, j]: logits (n, levels, C) at column j."""
        h = strip
        for layer, v_part, bias in zip(self.layers, from_v, biases):
            h = layer.horizontal(h, v_part, bias)
        return self.head(h[..., -1:]).view(h.shape[0], self.config.levels, self.config.channels)


def quantize(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Images in [-1, 1] -> int64 levels in [0, levels): round((x + 1) / 2 * (levels - 1))."""
    return ((images.float().clamp(-1, 1) + 1) * ((levels - 1) / 2)).round().long()


def dequantize(q: torch.Tensor, levels: int) -> torch.Tensor:
    """Levels -> images in [-1, 1] (for grids)."""
    return q.float() * (2.0 / (levels - 1)) - 1.0


def marginal_bits_per_dim(train: torch.Tensor, held_out: torch.Tensor, levels: int) -> float:
    """The per-pixel marginal baseline: an independent categorical per (channel, row, column), its counts from
    ``train`` (add-one smoothed), evaluated on ``held_out``: mean bits per dimension."""
    flat_train, flat_test = train.flatten(1), held_out.flatten(1)  # (N, D)
    counts = torch.ones(flat_train.shape[1], levels)
    counts.scatter_add_(1, flat_train.T, torch.ones_like(flat_train.T, dtype=counts.dtype))
    log_p = (counts / counts.sum(1, keepdim=True)).log()  # (D, levels)
    return float(-log_p.gather(1, flat_test.T).mean() / math.log(2))


__all__ = ["PixelCNNConfig", "PixelCNN", "quantize", "dequantize", "marginal_bits_per_dim"]
