"""What the `genfast sample <model>` commands share: --ckpt / --seed / --device / --backend, loading the run's
model with every failure a usage error, and PNG grids with --scale and a legend saying what the rows are.

(Training's shared flags and loop live in genfast.training: add_train_args, start_run, TrainTask.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, TypeVar

import torch

import genfast
from genfast.training import add_device_args, non_negative_int, positive_int, resolve_device, save_image_grid
from genfast.training.options import check_backend

T = TypeVar("T")


def add_sample_args(parser: argparse.ArgumentParser, *, ops: tuple[str, ...]) -> None:
    """--ckpt (required) --seed --device --backend."""
    parser.add_argument("--ckpt", type=Path, required=True,
                        help="the run folder of `genfast train` (its --out), or its checkpoint/ folder")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    add_device_args(parser, ops=ops)


def add_grid_args(parser: argparse.ArgumentParser, *, out: str, scale: int = 1) -> None:
    """--out (the PNG) and --scale."""
    parser.add_argument("--out", type=Path, default=Path(out), help=f"the PNG grid to write (default {out})")
    parser.add_argument("--scale", type=positive_int, default=scale,
                        help=f"enlarge each pixel to a scale x scale block, for small images (default {scale})")


def sample_device(parser: argparse.ArgumentParser, args: argparse.Namespace, ops: tuple[str, ...]) -> torch.device:
    """The device of --device, after checking --backend can run ``ops`` there (and selecting it)."""
    device = resolve_device(parser, args.device)
    check_backend(parser, args.backend, device, ops)
    if args.backend:
        genfast.set_backend(args.backend)
    return device


def load_or_exit(parser: argparse.ArgumentParser, load: Callable[[], T]) -> T:
    """``load()`` with a missing, foreign or broken checkpoint reported as a usage error on --ckpt."""
    try:
        return load()
    except (FileNotFoundError, ValueError, TypeError) as exc:
        parser.error(f"--ckpt: {exc}")


def write_grid(parser: argparse.ArgumentParser, images: torch.Tensor, path: Path, *, nrow: int | None,
               scale: int, legend: str) -> Path:
    """Save the grid; print where and what its rows show (``legend``). A bad --backend is a usage error."""
    try:
        written = save_image_grid(images, path, nrow=nrow, scale=scale)
    except OSError as exc:
        parser.error(f"--out {path}: {exc.strerror or exc}")
    print(f"wrote {written} ({images.shape[0]} images)\nrows: {legend}", file=sys.stderr)
    return written


def backend_errors(parser: argparse.ArgumentParser, call: Callable[[], T]) -> T:
    """``call()`` with a backend that cannot serve it (a dtype or size its kernel lacks) as a usage error."""
    try:
        return call()
    except genfast.BackendError as exc:
        parser.error(f"--backend: {exc}")
