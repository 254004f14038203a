"""PNG grids of generated images, written without any imaging library (zlib + the PNG format).

A self-contained encoder keeps ``genfast sample`` working on machines without Pillow (the GPU machines have
no package index); the files are ordinary 8-bit RGB or grayscale PNGs that every viewer opens.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import torch

from genfast._io import write_atomic


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: torch.Tensor) -> bytes:
    """PNG bytes of a uint8 image [H, W] (grayscale) or [H, W, 3] (RGB)."""
    if pixels.dtype != torch.uint8 or pixels.dim() not in (2, 3) or (pixels.dim() == 3 and pixels.shape[2] != 3):
        raise ValueError(f"pixels: need uint8 [H, W] or [H, W, 3], got {pixels.dtype} {list(pixels.shape)}")
    height, width = pixels.shape[:2]
    if height == 0 or width == 0:
        raise ValueError("pixels: the image is empty")
    color_type = 0 if pixels.dim() == 2 else 2
    rows = pixels.reshape(height, -1).cpu()
    # Each scanline starts with filter type 0 (none).
    raw = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), rows], dim=1).contiguous().numpy().tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(
        b"IEND", b"")


def make_grid(images: torch.Tensor, *, nrow: int | None = None, padding: int = 2,
              value_range: tuple[float, float] = (-1.0, 1.0), scale: int = 1) -> torch.Tensor:
    """uint8 [H, W, 3] (or [H, W] for one channel) tiling images [N, C, H, W] (C = 1 or 3) in rows of
    ``nrow`` (default: a near-square grid), values mapped from ``value_range`` to 0..255 and clamped; ``scale``
    enlarges every pixel to a scale x scale block (nearest neighbour: small images stay sharp)."""
    if isinstance(scale, bool) or not isinstance(scale, int) or not 1 <= scale <= 64:
        raise ValueError(f"scale must be an int in [1, 64], got {scale!r}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: need a tensor [N, C, H, W] with C = 1 or 3, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("images: need at least one image")
    lo, hi = value_range
    if not hi > lo:
        raise ValueError(f"value_range: need low < high, got {value_range}")
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    ncol_rows = math.ceil(n / nrow)
    scaled = ((images.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1).nan_to_num(0.0)
    pixels = (scaled * 255 + 0.5).to(torch.uint8)
    grid = torch.zeros(c, padding + ncol_rows * (h + padding), padding + nrow * (w + padding), dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y:y + h, x:x + w] = pixels[i]
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return grid[0] if c == 1 else grid.permute(1, 2, 0).contiguous()


TRAINING_GRID_SIDE = 64  # training grids enlarge each image to about this many pixels a side


def grid_scale(images: torch.Tensor) -> int:
    """The --scale a training grid of ``images`` [N, C, H, W] gets: small images enlarged (nearest neighbour, as
    `genfast sample --scale` does) to about TRAINING_GRID_SIDE pixels a side; a 16x16 grid was a 146x74 px file."""
    return max(1, min(8, TRAINING_GRID_SIDE // max(1, min(images.shape[-2:]))))


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, *, nrow: int | None = None, padding: int = 2,
                    value_range: tuple[float, float] = (-1.0, 1.0), scale: int = 1) -> Path:
    """Write images [N, C, H, W] as one PNG grid at ``path`` (atomically) and return the path."""
    data = encode_png(make_grid(images, nrow=nrow, padding=padding, value_range=value_range, scale=scale))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, data)
