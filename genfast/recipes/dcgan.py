"""`genfast train dcgan` and `genfast sample dcgan`: DCGAN on digits, generated shapes or a folder of images.

    genfast train dcgan --steps 2000 --out runs/dcgan                 # digits, 32x32 grayscale, offline
    genfast train dcgan --data shapes --channels 3 --image-size 64
    torchrun --nproc-per-node 2 -m genfast train dcgan --data DIR     # DDP
    genfast sample dcgan --ckpt runs/dcgan --n 64 --out grid.png

Sample grids from one fixed latent batch are written every --sample-every steps and at the end to
<out>/samples/ (step_000500.png, ..., final.png), so the grids show one set of images improving.
"""

from __future__ import annotations

import argparse

import torch

from genfast.models.dcgan import DCGANConfig, Discriminator, Generator
from genfast.recipes._common import (
    add_grid_args,
    add_sample_args,
    backend_errors,
    load_or_exit,
    sample_device,
    write_grid,
)
from genfast.recipes._gan import (
    GANTask,
    add_gan_args,
    add_image_args,
    grid_writer,
    in_eval_mode,
    load_image_data,
    real_images,
)
from genfast.training import CommandParser, add_train_args, mark_fixed, positive_int, start_run

OPS = ("conv_transpose2d",)


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="genfast train dcgan", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, recipe="dcgan", steps=2000, batch_size=128, lr=2e-4, ops=OPS)
    add_gan_args(parser)
    add_image_args(parser, data="digits")
    mark_fixed(parser, "--data", "--image-size", "--channels", "--latent-dim", "--g-features", "--d-features")
    return parser


def train_main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    with start_run(parser, args, recipe="dcgan", ops=OPS) as run:
        try:
            if run.resuming:
                config = DCGANConfig.from_dict(run.saved_config["model"])
            else:
                channels = args.channels or (1 if args.data == "digits" else 3)
                config = DCGANConfig(args.image_size, channels, args.latent_dim, args.g_features, args.d_features)
        except ValueError as exc:
            parser.error(str(exc))
        data = load_image_data(parser, args.data, config.image_size, config.channels, args.seed)
        G, D = Generator(config), Discriminator(config)
        fixed_z = G.latent(args.n_samples, torch.Generator().manual_seed(args.seed), device=run.device)
        evaluate, finish = grid_writer(run, in_eval_mode(G, lambda: G(fixed_z)))

        def fake(gen, batch, extra):
            return gen(torch.randn(batch, config.latent_dim, device=run.device))

        task = GANTask(run, G, D, config.to_dict(), real=real_images(data.images, None, run), fake=fake,
                       evaluate=evaluate, finish=finish)
        return run.train(task)


def sample_main(argv: list[str]) -> int:
    parser = CommandParser(prog="genfast sample dcgan", description="Write a PNG grid of DCGAN samples.")
    add_sample_args(parser, ops=OPS)
    parser.add_argument("--n", type=positive_int, default=64, help="number of images (default 64)")
    parser.add_argument("--nrow", type=positive_int, default=None, help="images per row (default: a square grid)")
    add_grid_args(parser, out="dcgan_samples.png")
    args = parser.parse_args(argv)
    device = sample_device(parser, args, OPS)
    G = load_or_exit(parser, lambda: Generator.from_checkpoint(args.ckpt, device,
                                                                allow_nonfinite=args.allow_nonfinite))
    with torch.no_grad():
        images = backend_errors(parser, lambda: G(G.latent(args.n, torch.Generator().manual_seed(args.seed))))
    write_grid(parser, images, args.out, nrow=args.nrow, scale=args.scale,
               legend=f"{args.n} samples, one random latent each (--seed {args.seed})")
    return 0
