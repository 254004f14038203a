"""`genfast train cgan` and `genfast sample cgan`: a class-conditional DCGAN; you choose what it draws.

    genfast train cgan --steps 3000 --out runs/cgan                  # generated coloured shapes, offline
    genfast train cgan --data digits --out runs/cgan-digits
    genfast train cgan --data DIR                                     # one subfolder per class
    genfast sample cgan --ckpt runs/cgan --label "red circle" --n 16 --out red_circles.png
    genfast sample cgan --ckpt runs/cgan --label 4 --interpolate --steps 10 --out walk.png

Sample grids (one row per class, one fixed latent per column) go to <out>/samples/ during and after training.
"""

from __future__ import annotations

import argparse
import sys

import torch

from genfast.models.cgan import CGANConfig, Discriminator, Generator, interpolate, resolve_label
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
    mode_seeking_penalty,
    real_images,
)
from genfast.training import CommandParser, add_train_args, mark_fixed, non_negative_float, positive_int, start_run

OPS = ("conv_transpose2d",)


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="genfast train cgan", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, recipe="cgan", steps=3000, batch_size=128, lr=2e-4, ops=OPS)
    add_gan_args(parser)
    add_image_args(parser, data="shapes")
    parser.add_argument("--embed-dim", type=positive_int, default=50, help="size of the label embedding")
    parser.add_argument("--mode-seeking", type=non_negative_float, default=0.2,
                        help="weight of the mode-seeking term (MSGAN) in G's loss, which keeps the samples of one "
                             "class apart (without it each class collapsed to nearly one image); 0: off (default 0.2)")
    mark_fixed(parser, "--data", "--image-size", "--channels", "--latent-dim", "--g-features", "--d-features",
               "--embed-dim")
    return parser


def class_grid_labels(num_classes: int, n: int) -> tuple[torch.Tensor, int]:
    """Labels for a grid with one row per class and max(1, n // num_classes) columns, and that column count."""
    per_row = max(1, n // num_classes)
    return torch.arange(num_classes).repeat_interleave(per_row), per_row


def train_main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    with start_run(parser, args, recipe="cgan", ops=OPS) as run:
        if run.resuming:
            try:
                config = CGANConfig.from_dict(run.saved_config["model"])
            except ValueError as exc:
                parser.error(f"--resume: {exc}")
            size, channels = config.image_size, config.channels
        else:
            size, channels = args.image_size, args.channels or (1 if args.data == "digits" else 3)
        data = load_image_data(parser, args.data, size, channels, args.seed)
        if data.labels is None:
            parser.error(f"--data {args.data}: the conditional GAN needs labelled images: 'digits', 'shapes', or a "
                         "folder with one subfolder of images per class")
        if not run.resuming:
            try:
                config = CGANConfig(data.num_classes, size, channels, args.latent_dim, args.embed_dim,
                                    args.g_features, args.d_features, data.class_names)
            except ValueError as exc:
                parser.error(str(exc))
        elif tuple(data.class_names) != config.class_names:
            parser.error(f"--resume: the checkpoint's classes {list(config.class_names)} differ from --data's "
                         f"{list(data.class_names)}")
        G, D = Generator(config), Discriminator(config)
        grid_labels, per_row = class_grid_labels(config.num_classes, args.n_samples)
        grid_labels = grid_labels.to(run.device)
        # One latent per column, shared by the rows: each column shows one "style" in every class.
        fixed_z = G.latent(per_row, torch.Generator().manual_seed(args.seed), device=run.device)
        fixed_z = fixed_z.repeat(config.num_classes, 1)
        evaluate, finish = grid_writer(run, in_eval_mode(G, lambda: G(fixed_z, grid_labels)), nrow=per_row)

        latents = {}  # this step's z, for the mode-seeking term

        def fake(gen, batch, extra):
            (labels,) = extra  # fakes of the real batch's classes: D sees the same class balance in both
            latents["z"] = torch.randn(batch, config.latent_dim, device=run.device)
            return gen(latents["z"], labels)

        def diversity(x_fake, extra):
            return args.mode_seeking * mode_seeking_penalty(x_fake, latents["z"], extra[0])

        task = GANTask(run, G, D, config.to_dict(), real=real_images(data.images, data.labels, run), fake=fake,
                       evaluate=evaluate, finish=finish,
                       generator_penalty=diversity if args.mode_seeking > 0 else None)
        return run.train(task)


PER_ROW = 8  # sample's default: images of one class, or per class


def _class_name(config: CGANConfig, index: int) -> str:
    return config.class_names[index] if config.class_names else str(index)


def sample_main(argv: list[str]) -> int:
    parser = CommandParser(prog="genfast sample cgan", description="Write a PNG grid from a trained conditional GAN.")
    add_sample_args(parser, ops=OPS)
    parser.add_argument("--label", default=None,
                        help="the class to draw, by name (e.g. 'red circle') or index; default: every class")
    parser.add_argument("--n", type=positive_int, default=None,
                        help="images in all: of --label's class (default 8), or without --label one row per class, "
                             "--n / classes images each (default 8 per class); with --interpolate: the number of "
                             "interpolation rows (default 8)")
    parser.add_argument("--interpolate", action="store_true",
                        help="rows walking from one random latent to another (same class along a row)")
    parser.add_argument("--steps", type=positive_int, default=8, help="images per interpolation row (default 8)")
    parser.add_argument("--mode", choices=("slerp", "linear"), default="slerp", help="interpolation path")
    add_grid_args(parser, out="cgan_samples.png")
    args = parser.parse_args(argv)
    if args.interpolate and args.steps < 2:
        parser.error(f"--steps must be >= 2, got {args.steps}")
    device = sample_device(parser, args, OPS)
    G = load_or_exit(parser, lambda: Generator.from_checkpoint(args.ckpt, device,
                                                                allow_nonfinite=args.allow_nonfinite))
    config = G.config
    try:
        label = None if args.label is None else resolve_label(args.label, config.class_names, config.num_classes)
    except (ValueError, TypeError) as exc:
        parser.error(f"--label: {exc}")
    gen = torch.Generator().manual_seed(args.seed)
    if args.interpolate:
        rows = args.n or PER_ROW
        row_labels = torch.full((rows,), label) if label is not None else torch.arange(rows) % config.num_classes
        z0, z1 = G.latent(rows, gen), G.latent(rows, gen)
        z = interpolate(z0, z1, args.steps, args.mode).transpose(0, 1).reshape(rows * args.steps, -1)  # row-major
        labels, nrow = row_labels.repeat_interleave(args.steps), args.steps
        legend = (f"one {args.mode} walk per row between two random latents, class per row: "
                  + ", ".join(_class_name(config, int(i)) for i in row_labels))
    elif label is not None:
        n = args.n or PER_ROW
        z, labels, nrow = G.latent(n, gen), torch.full((n,), label), None
        legend = f"{n} samples of class {_class_name(config, label)}"
    else:
        # --n is the total (18 used to mean 18 per class: 162 images); every row holds the same latents.
        per_class = PER_ROW if args.n is None else max(1, args.n // config.num_classes)
        if args.n is not None and per_class * config.num_classes != args.n:
            print(f"--n {args.n}: writing {per_class * config.num_classes} images, {per_class} for each of the "
                  f"{config.num_classes} classes (a row per class; a multiple of {config.num_classes} fills them "
                  "exactly)", file=sys.stderr)
        labels = torch.arange(config.num_classes).repeat_interleave(per_class)
        z, nrow = G.latent(per_class, gen).repeat(config.num_classes, 1), per_class
        legend = ("one class per row (each column one latent): "
                  + ", ".join(_class_name(config, i) for i in range(config.num_classes)))
    with torch.no_grad():
        images = backend_errors(parser, lambda: G(z.to(device), labels.to(device)))
    write_grid(parser, images, args.out, nrow=nrow, scale=args.scale, legend=legend)
    return 0
