"""`genfast train dcgan` and `genfast sample dcgan`: DCGAN on digits, generated shapes or a folder of images.

    genfast train dcgan --steps 2000 --out runs/dcgan                 # digits, 32x32 grayscale, offline
    genfast train dcgan --data shapes --channels 3 --image-size 64
    torchrun --nproc-per-node 2 -m genfast train dcgan --data DIR     # DDP
    genfast sample dcgan --ckpt runs/dcgan --n 64 --out grid.png

Sample grids from one fixed latent batch are written every --sample-every steps and at the end to
<out>_samples/ (step_000500.png, ..., final.png), so the grids show one set of images improving.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import genfast
from genfast.models.dcgan import DCGANConfig, Discriminator, Generator
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
    parser = argparse.ArgumentParser(prog="genfast train dcgan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_train_args(parser, steps=2000, batch_size=128, lr=2e-4, out="runs/dcgan")
    add_gan_args(parser)
    add_image_args(parser, data="digits")
    return parser


def model_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> DCGANConfig:
    """The model config: from the checkpoint when resuming, else from the options."""
    if args.resume:
        try:
            return DCGANConfig(**checkpoint_config(args.out, "dcgan")["model"])
        except (FileNotFoundError, ValueError, TypeError) as exc:
            parser.error(f"--resume: {exc}")
    channels = args.channels or (1 if args.data == "digits" else 3)
    try:
        return DCGANConfig(args.image_size, channels, args.latent_dim, args.g_features, args.d_features)
    except ValueError as exc:
        parser.error(str(exc))


def train_main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    check_positive(parser, args, "steps", "batch_size", "lr", "save_every", "sample_every", "n_samples")
    config = model_config(parser, args)
    data = load_image_data(parser, args.data, config.image_size, config.channels, args.seed)
    dist = start_run(args)
    if args.batch_size % dist.world_size:
        parser.error(f"--batch-size {args.batch_size} must be divisible by the {dist.world_size} processes")
    try:
        G, D = Generator(config), Discriminator(config)
        fixed_z = G.latent(args.n_samples, torch.Generator().manual_seed(args.seed), device=dist.device)
        out_dir = samples_dir(args)

        def fake(gen, batch, extra):
            return gen(torch.randn(batch, config.latent_dim, device=dist.device))

        def evaluate(step: int, final: bool) -> bool:
            if dist.is_main:
                G.eval()
                with torch.no_grad():
                    images = G(fixed_z)
                G.train()
                save_image_grid(images, out_dir / ("final.png" if final else f"step_{step:06d}.png"))
            return False

        task = GANTask("dcgan", G, D, config.to_dict(), real_images(data.images, None, args, dist), fake, evaluate)
        return train_gan(args, dist, task)
    finally:
        dist.close()


def load_generator(parser: argparse.ArgumentParser, ckpt: Path, device: torch.device) -> Generator:
    try:
        G = Generator(DCGANConfig(**checkpoint_config(ckpt, "dcgan")["model"]))
        load_checkpoint(ckpt, modules={"generator": G})
    except (FileNotFoundError, ValueError, TypeError) as exc:
        parser.error(f"--ckpt: {exc}")
    return G.to(device).eval()


def sample_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="genfast sample dcgan", description="Write a PNG grid of DCGAN samples.")
    parser.add_argument("--ckpt", type=Path, required=True, help="the checkpoint folder (train's --out)")
    parser.add_argument("--n", type=int, default=64, help="number of images (default 64)")
    parser.add_argument("--out", type=Path, default=Path("dcgan_samples.png"), help="the PNG to write")
    parser.add_argument("--nrow", type=int, default=None, help="images per row (default: a square grid)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default=None, choices=genfast.BACKENDS)
    args = parser.parse_args(argv)
    check_positive(parser, args, "n")
    if args.backend:
        genfast.set_backend(args.backend)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    G = load_generator(parser, args.ckpt, device)
    try:
        with torch.no_grad():
            images = G(G.latent(args.n, torch.Generator().manual_seed(args.seed)))
    except genfast.BackendError as exc:
        parser.error(f"--backend: {exc}")
    path = save_image_grid(images, args.out, nrow=args.nrow)
    print(f"wrote {args.n} samples to {path}")
    return 0
