"""`genfast train cgan` and `genfast sample cgan`: a class-conditional DCGAN; you choose what it draws.

    genfast train cgan --steps 3000 --out runs/cgan                  # generated coloured shapes, offline
    genfast train cgan --data digits --out runs/cgan-digits
    genfast train cgan --data DIR                                     # one subfolder per class
    genfast sample cgan --ckpt runs/cgan --label "red circle" --n 16 --out red_circles.png
    genfast sample cgan --ckpt runs/cgan --label 4 --interpolate --steps 10 --out walk.png

Sample grids (one row per class, one fixed latent per column) go to <out>_samples/ during and after training.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import genfast
from genfast.models.cgan import CGANConfig, Discriminator, Generator, interpolate, resolve_label
from genfast.recipes._common import add_common_train_args, check_positive, start_run
from genfast.recipes._gan import (
    GANTask,
    add_gan_args,
    add_image_args,
    checkpoint_config,
    load_image_data,
    real_images,
    samples_dir,
    train_gan,
)
from genfast.training import load_checkpoint, save_image_grid


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genfast train cgan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_train_args(parser, steps=3000, batch_size=128, lr=2e-4, out="runs/cgan")
    add_gan_args(parser)
    add_image_args(parser, data="shapes")
    parser.add_argument("--embed-dim", type=int, default=50, help="size of the label embedding")
    return parser


def _config_from_checkpoint(ckpt: Path) -> CGANConfig:
    model = dict(checkpoint_config(ckpt, "cgan")["model"])
    model["class_names"] = tuple(model.get("class_names", ()))
    return CGANConfig(**model)


def class_grid_labels(num_classes: int, n: int) -> tuple[torch.Tensor, int]:
    """Labels for a grid with one row per class and max(1, n // num_classes) columns, and that column count."""
    per_row = max(1, n // num_classes)
    return torch.arange(num_classes).repeat_interleave(per_row), per_row


def train_main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    check_positive(parser, args, "steps", "batch_size", "lr", "save_every", "sample_every", "n_samples",
                   "embed_dim")
    if args.resume:
        try:
            config = _config_from_checkpoint(args.out)
        except (FileNotFoundError, ValueError, TypeError) as exc:
            parser.error(f"--resume: {exc}")
        size, channels = config.image_size, config.channels
    else:
        size, channels = args.image_size, args.channels or (1 if args.data == "digits" else 3)
    data = load_image_data(parser, args.data, size, channels, args.seed)
    if data.labels is None:
        parser.error(f"--data {args.data}: the conditional GAN needs labelled images: 'digits', 'shapes', or a "
                     "folder with one subfolder of images per class")
    if not args.resume:
        try:
            config = CGANConfig(data.num_classes, size, channels, args.latent_dim, args.embed_dim, args.g_features,
                                args.d_features, data.class_names)
        except ValueError as exc:
            parser.error(str(exc))
    elif tuple(data.class_names) != config.class_names:
        parser.error(f"--resume: the checkpoint's classes {list(config.class_names)} differ from --data's "
                     f"{list(data.class_names)}")
    dist = start_run(args)
    if args.batch_size % dist.world_size:
        parser.error(f"--batch-size {args.batch_size} must be divisible by the {dist.world_size} processes")
    try:
        G, D = Generator(config), Discriminator(config)
        grid_labels, per_row = class_grid_labels(config.num_classes, args.n_samples)
        grid_labels = grid_labels.to(dist.device)
        # One latent per column, shared by the rows: each column shows one "style" in every class.
        fixed_z = G.latent(per_row, torch.Generator().manual_seed(args.seed), device=dist.device)
        fixed_z = fixed_z.repeat(config.num_classes, 1)
        out_dir = samples_dir(args)

        def fake(gen, batch, extra):
            (labels,) = extra  # fakes of the real batch's classes: D sees the same class balance in both
            return gen(torch.randn(batch, config.latent_dim, device=dist.device), labels)

        def evaluate(step: int, final: bool) -> bool:
            if dist.is_main:
                G.eval()
                with torch.no_grad():
                    images = G(fixed_z, grid_labels)
                G.train()
                save_image_grid(images, out_dir / ("final.png" if final else f"step_{step:06d}.png"), nrow=per_row)
            return False

        task = GANTask("cgan", G, D, config.to_dict(), real_images(data.images, data.labels, args, dist), fake,
                       evaluate)
        return train_gan(args, dist, task)
    finally:
        dist.close()


def sample_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="genfast sample cgan",
                                     description="Write a PNG grid from a trained conditional GAN.")
    parser.add_argument("--ckpt", type=Path, required=True, help="the checkpoint folder (train's --out)")
    parser.add_argument("--label", default=None,
                        help="the class to draw, by name (e.g. 'red circle') or index; default: every class")
    parser.add_argument("--n", type=int, default=8,
                        help="images of --label's class, or per class (one row each) without --label; with "
                             "--interpolate: the number of interpolation rows")
    parser.add_argument("--interpolate", action="store_true",
                        help="rows walking from one random latent to another (same class along a row)")
    parser.add_argument("--steps", type=int, default=8, help="images per interpolation row (default 8)")
    parser.add_argument("--mode", choices=("slerp", "linear"), default="slerp", help="interpolation path")
    parser.add_argument("--out", type=Path, default=Path("cgan_samples.png"), help="the PNG to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default=None, choices=genfast.BACKENDS)
    args = parser.parse_args(argv)
    check_positive(parser, args, "n")
    if args.interpolate and args.steps < 2:
        parser.error(f"--steps must be >= 2, got {args.steps}")
    if args.backend:
        genfast.set_backend(args.backend)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        config = _config_from_checkpoint(args.ckpt)
        G = Generator(config)
        load_checkpoint(args.ckpt, modules={"generator": G})
    except (FileNotFoundError, ValueError, TypeError) as exc:
        parser.error(f"--ckpt: {exc}")
    try:
        label = None if args.label is None else resolve_label(args.label, config.class_names, config.num_classes)
    except (ValueError, TypeError) as exc:
        parser.error(f"--label: {exc}")
    G = G.to(device).eval()
    gen = torch.Generator().manual_seed(args.seed)
    if args.interpolate:
        rows = args.n
        row_labels = torch.full((rows,), label) if label is not None else torch.arange(rows) % config.num_classes
        z0, z1 = G.latent(rows, gen), G.latent(rows, gen)
        z = interpolate(z0, z1, args.steps, args.mode).transpose(0, 1).reshape(rows * args.steps, -1)  # row-major
        labels, nrow = row_labels.repeat_interleave(args.steps), args.steps
    elif label is not None:
        z, labels, nrow = G.latent(args.n, gen), torch.full((args.n,), label), None
    else:
        labels = torch.arange(config.num_classes).repeat_interleave(args.n)
        z, nrow = G.latent(args.n, gen).repeat(config.num_classes, 1), args.n
    try:
        with torch.no_grad():
            images = G(z.to(device), labels.to(device))
    except genfast.BackendError as exc:
        parser.error(f"--backend: {exc}")
    path = save_image_grid(images, args.out, nrow=nrow)
    if args.interpolate:
        what = "interpolation rows"
    elif label is not None:
        what = f"class {config.class_names[label] if config.class_names else label}"
    else:
        what = "every class"
    print(f"wrote {images.shape[0]} images ({what}) to {path}")
    return 0
