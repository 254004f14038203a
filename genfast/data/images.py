"""Image datasets with no download: scikit-learn's bundled digits, procedurally drawn shapes with known
attributes, two generated domains for CycleGAN, and any folder of images (Pillow) for real use.

Every loader returns float32 images [N, C, H, W] scaled to [-1, 1] (what a Tanh generator outputs) and, where
the data has them, int64 labels [N]. ``load_images(name_or_dir, ...)`` is what the training recipes call.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95)}


@dataclass
class ImageData:
    """images [N, C, H, W] in [-1, 1]; labels [N] int64 or None; class_names for the labels."""
    images: torch.Tensor
    labels: torch.Tensor | None = None
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _check_size(image_size: int, channels: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 4 <= image_size <= 1024:
        raise ValueError(f"image_size must be an int in [4, 1024], got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")


def _to_channels(images: torch.Tensor, channels: int) -> torch.Tensor:
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True)


def digits(image_size: int = 32, channels: int = 1) -> ImageData:
    """scikit-learn's 1797 handwritten digits (8x8, bundled with the package), resized; labels 0..9."""
    _check_size(image_size, channels)
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("the digits dataset needs scikit-learn (pip install scikit-learn); "
                          "or use the 'shapes' dataset, which needs nothing") from exc
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # values 0..16
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = _to_channels(images.clamp(0, 1) * 2 - 1, channels)
    return ImageData(images, torch.tensor(bunch.target, dtype=torch.int64), tuple(str(i) for i in range(10)))


def _shape_mask(kind: str, yy: torch.Tensor, xx: torch.Tensor, cy: float, cx: float, r: float) -> torch.Tensor:
    if kind == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if kind == "square":
        return ((yy - cy).abs() <= r * 0.85) & ((xx - cx).abs() <= r * 0.85)
    # an upright triangle: below the apex, above the base, inside both slanted sides
    top, bottom = cy - r, cy + r * 0.8
    half_width = (yy - top) / (bottom - top) * r
    return (yy >= top) & (yy <= bottom) & ((xx - cx).abs() <= half_width)


def shapes(n: int = 2048, image_size: int = 32, channels: int = 3, *, seed: int = 0,
           shape_names: tuple[str, ...] = SHAPES, background: tuple[float, float, float] = (0.95, 0.95, 0.92)
           ) -> ImageData:
    """Coloured shapes on a plain background, drawn from a seeded generator (the same n and seed give the same
    images). Label = shape index * 3 + colour index, named e.g. "red circle"; sizes and positions vary."""
    _check_size(image_size, channels)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    unknown = [s for s in shape_names if s not in SHAPES]
    if not shape_names or unknown:
        raise ValueError(f"shape_names: need a non-empty subset of {SHAPES}, got {shape_names!r}")
    g = torch.Generator().manual_seed(seed)
    kinds = torch.randint(len(shape_names), (n,), generator=g)
    colors = torch.randint(len(COLORS), (n,), generator=g)
    radius = (0.22 + 0.12 * torch.rand(n, generator=g)) * image_size
    center = (0.3 + 0.4 * torch.rand(n, 2, generator=g)) * image_size
    coords = torch.arange(image_size, dtype=torch.float32) + 0.5
    yy, xx = coords[:, None], coords[None, :]
    palette = torch.tensor(list(COLORS.values()))
    images = torch.tensor(background, dtype=torch.float32).view(1, 3, 1, 1).repeat(n, 1, image_size, image_size)
    for i in range(n):
        mask = _shape_mask(shape_names[int(kinds[i])], yy, xx, float(center[i, 0]), float(center[i, 1]),
                           float(radius[i]))
        images[i][:, mask] = palette[colors[i]].view(3, 1)
    names = tuple(f"{c} {s}" for s in shape_names for c in COLORS)
    labels = kinds * len(COLORS) + colors
    return ImageData(_to_channels(images * 2 - 1, channels), labels, names)


def shape_domains(n: int = 1024, image_size: int = 32, *, seed: int = 0) -> tuple[ImageData, ImageData]:
    """Two unpaired domains for CycleGAN: circles (A) and squares (B), colours and sizes drawn independently."""
    a = shapes(n, image_size, 3, seed=seed, shape_names=("circle",))
    b = shapes(n, image_size, 3, seed=seed + 1, shape_names=("square",))
    return a, b


def image_folder(directory: str | os.PathLike, image_size: int | None = None, channels: int = 3, *,
                 max_images: int | None = None) -> ImageData:
    """Every image file under ``directory`` (sorted; subfolders become class labels when there are any).

    With image_size, each image is centre-cropped to a square and resized; without it all images must already
    have the same size. Errors name the folder or the file: a missing or empty folder, an unreadable image,
    mismatched sizes.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"data: {directory} is not a folder")
    if image_size is not None:
        _check_size(image_size, channels)
    elif channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if max_images is not None:
        files = files[:max_images]
    if not files:
        raise ValueError(f"data: no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("reading an image folder needs Pillow (pip install pillow)") from exc
    class_dirs = sorted({p.parent.relative_to(directory).as_posix() for p in files} - {"."})
    tensors, labels = [], []
    for path in files:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if channels == 3 else "L")
                if image_size is not None:
                    side = min(im.size)
                    left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
                    im = im.crop((left, top, left + side, top + side)).resize((image_size, image_size),
                                                                               Image.BICUBIC)
                pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
                pixels = pixels.view(im.size[1], im.size[0], channels).permute(2, 0, 1)
        except (OSError, ValueError) as exc:
            raise ValueError(f"data: cannot read image {path}: {exc}") from exc
        if tensors and pixels.shape != tensors[0].shape:
            raise ValueError(f"data: {path} is {pixels.shape[2]}x{pixels.shape[1]} but {files[0]} is "
                             f"{tensors[0].shape[2]}x{tensors[0].shape[1]}; pass image_size to resize them all")
        tensors.append(pixels)
        rel = path.parent.relative_to(directory).as_posix()
        labels.append(class_dirs.index(rel) if class_dirs and rel != "." else -1)
    images = torch.stack(tensors).float() / 127.5 - 1
    have_labels = bool(class_dirs) and all(label >= 0 for label in labels)
    return ImageData(images, torch.tensor(labels) if have_labels else None,
                     tuple(class_dirs) if have_labels else ())


def load_images(source: str | os.PathLike, image_size: int = 32, channels: int = 3, *, n: int = 2048,
                seed: int = 0) -> ImageData:
    """``source`` is "digits", "shapes", or a folder of images."""
    if source == "digits":
        return digits(image_size, channels)
    if source == "shapes":
        return shapes(n, image_size, channels, seed=seed)
    return image_folder(source, image_size, channels)


def batch_indices(num_items: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Random indices for one batch (with replacement across batches; a pure function of the generator)."""
    if num_items < 1:
        raise ValueError("the dataset is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return torch.randint(num_items, (batch_size,), generator=generator)


def grid_rows(n: int) -> int:
    """Images per row of a near-square sample grid."""
    return max(1, math.ceil(math.sqrt(n)))
