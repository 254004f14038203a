"""`genfast train vae` and `genfast sample vae`: a convolutional VAE on digits, shapes or a folder of images.

    genfast train vae --steps 2000 --out runs/vae                    # scikit-learn's digits at 32x32
    genfast train vae --data shapes --image-size 32 --out runs/shapes
    genfast sample vae --ckpt runs/vae --mode prior --out prior.png
    genfast sample vae --ckpt runs/shapes --mode arithmetic --attribute-with red --attribute-without blue

Training writes <out>/checkpoint (atomic; --resume continues exactly where it stopped), a grid of prior samples
to <out>/samples/step_<N>.png every --sample-every steps, and <out>/samples.png and <out>/reconstructions.png at
the end. Under torchrun each process takes its slice of every global batch (DDP).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

import genfast
from genfast.data.images import ImageData, batch_indices, load_images
from genfast.models.vae import VAE, VAEConfig, vae_loss
from genfast.recipes._common import (
    add_common_train_args,
    autocast,
    check_positive,
    checkpoint_and_sample,
    checkpoint_config,
    start_run,
)
from genfast.training import (
    StopOnInterrupt,
    batch_generator,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    progress_bar,
    restore_rng_state,
    save_checkpoint,
    save_image_grid,
)

MODES = ("prior", "reconstruct", "interpolate", "arithmetic")
GRID_SIZE = 64


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genfast train vae", description="Train a convolutional VAE.")
    add_common_train_args(parser, steps=3000, batch_size=64, lr=1e-3, out="runs/vae")
    parser.add_argument("--data", default="digits", help="digits (default), shapes, or a folder of images")
    parser.add_argument("--image-size", type=int, default=32, help="a power of two in [8, 256] (default 32)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="image channels (default: 1 for digits, 3 otherwise)")
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--beta", type=float, default=1.0, help="weight of the KL term (default 1)")
    return parser


def _load_data(parser: argparse.ArgumentParser, source: str, image_size: int, channels: int,
               seed: int) -> ImageData:
    try:
        return load_images(source, image_size, channels, seed=seed)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        parser.error(f"--data: {exc}")


def _noise_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The reparameterization noise of one step and rank: a pure function of them, so resume replays it (and
    distinct from the data's stream, which uses rank slot 0)."""
    seed_value = int(torch.randint(2**62, (), generator=batch_generator(seed, step, rank + 1)))
    return torch.Generator(device=device).manual_seed(seed_value)


def _grid_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def train_main(argv: list[str]) -> int:
    parser = _train_parser()
    args = parser.parse_args(argv)
    check_positive(parser, args, "steps", "batch_size", "lr", "save_every", "sample_every", "image_size",
                   "latent_dim", "base_channels")
    channels = args.channels or (1 if args.data == "digits" else 3)
    try:
        config = VAEConfig(image_size=args.image_size, channels=channels, latent_dim=args.latent_dim,
                           base_channels=args.base_channels, beta=args.beta)
    except ValueError as exc:
        parser.error(str(exc))
    data = _load_data(parser, args.data, args.image_size, channels, args.seed)
    meta = {"model": "vae", "config": config.to_dict(), "data": str(args.data), "seed": args.seed}
    ckpt_dir = args.out / "checkpoint"
    if args.resume:
        found = find_checkpoint(ckpt_dir)
        if found is None:
            parser.error(f"--resume: no checkpoint in {args.out}")
        _, saved = load_checkpoint(found)
        if saved.get("config") != meta["config"] or saved.get("model") != "vae":
            parser.error(f"--resume: the checkpoint in {args.out} was trained with another model config "
                         f"({saved.get('config')}); pass the same options")
    dist = start_run(args)
    try:
        if args.batch_size % dist.world_size:
            parser.error(f"--batch-size {args.batch_size} must divide by the {dist.world_size} processes")
        return _train(args, config, data, meta, dist)
    finally:
        dist.close()


def _train(args, config: VAEConfig, data: ImageData, meta: dict, dist) -> int:
    device = dist.device
    model = VAE(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    ckpt_dir, samples_dir = args.out / "checkpoint", args.out / "samples"
    step = 0
    if args.resume:
        state, _ = load_checkpoint(ckpt_dir, modules={"vae": model}, map_location=device)
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        restore_rng_state(state["rng"])
    ddp = dist.wrap(model)
    images = data.images

    def save() -> None:
        if dist.is_main:
            save_checkpoint(ckpt_dir, modules={"vae": model}, config=meta,
                            trainer_state={"step": step, "optimizer": optimizer.state_dict(),
                                           "rng": capture_rng_state()})
        dist.barrier()

    def sample_grid(path: Path) -> None:
        model.eval()
        with torch.no_grad():
            save_image_grid(model.sample(GRID_SIZE, generator=_grid_generator(args.seed, device)), path)
        model.train()

    bar = progress_bar(args.steps, initial=step, desc="vae", enabled=dist.is_main and not args.quiet)
    with StopOnInterrupt() as stop:
        while step < args.steps:
            index = batch_indices(len(images), args.batch_size, batch_generator(args.seed, step))
            batch = dist.shard(images[index]).to(device, non_blocking=True)
            with autocast(device):
                recon, mu, logvar = ddp(batch, generator=_noise_generator(args.seed, step, dist.rank, device))
            losses = vae_loss(batch, recon, mu, logvar, config.beta)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            step += 1
            loss = losses["loss"].item()
            if not math.isfinite(loss):
                print(f"genfast train vae: the loss is {loss} at step {step}; stopping (lower --lr?)",
                      file=sys.stderr)
                return 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.2f}", recon=f"{losses['recon'].item():.2f}",
                            kl=f"{losses['kl'].item():.2f}")
            stopping = dist.any(stop.requested)
            if checkpoint_and_sample(step, args, dist, stopping=stopping, save=save, sample_grid=sample_grid,
                                     samples_dir=samples_dir):
                break
    bar.close()
    if dist.is_main and step >= args.steps:
        sample_grid(args.out / "samples.png")
        model.eval()
        with torch.no_grad():
            originals = images[:32].to(device)
            save_image_grid(_pairs_in_rows(originals, model.reconstruct(originals)),
                            args.out / "reconstructions.png", nrow=8)
        print(f"checkpoint: {ckpt_dir}\nsamples: {args.out / 'samples.png'}", file=sys.stderr)
    return 0


def _pairs_in_rows(top: torch.Tensor, bottom: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """Rows of ``per_row`` images of ``top`` each followed by the matching row of ``bottom``."""
    rows = []
    for start in range(0, top.shape[0], per_row):
        rows += [top[start:start + per_row], bottom[start:start + per_row]]
    return torch.cat(rows)


# --------------------------------------------------------------------------------------------------- sample
def _sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genfast sample vae", description="Images from a trained VAE.")
    parser.add_argument("--ckpt", type=Path, required=True, help="the --out folder of training, or its checkpoint")
    parser.add_argument("--mode", default="prior", choices=MODES,
                        help="prior: samples from N(0, I); reconstruct: data (odd rows) and reconstructions; "
                             "interpolate: one row per pair of images; arithmetic: add an attribute vector")
    parser.add_argument("--n", type=int, default=64, help="images (prior, reconstruct) or rows (interpolate)")
    parser.add_argument("--steps", type=int, default=8, help="frames per interpolation (default 8)")
    parser.add_argument("--data", default=None, help="images for reconstruct/interpolate/arithmetic "
                                                     "(default: the training data)")
    parser.add_argument("--attribute-with", default=None, help="class (or word of a class name) that has the "
                                                               "attribute (arithmetic; default: red / first class)")
    parser.add_argument("--attribute-without", default=None, help="class without it (default: blue / second)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiple of the attribute vector to add")
    parser.add_argument("--out", type=Path, default=Path("vae_samples.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default=None, choices=genfast.BACKENDS)
    return parser


def load_vae(ckpt: Path, device: torch.device | str = "cpu") -> tuple[VAE, dict]:
    """The VAE of a checkpoint folder (the training --out folder or its checkpoint/) and its saved metadata."""
    directory, meta = checkpoint_config(ckpt, "vae", "VAE")
    model = VAE(VAEConfig(**meta["config"]))
    load_checkpoint(directory, modules={"vae": model})
    return model.to(device).eval(), meta


def _class_indices(parser, data: ImageData, name: str, option: str) -> torch.Tensor:
    """Indices of the images whose class is ``name`` or whose class name has ``name`` as one of its words."""
    if data.labels is None:
        parser.error(f"{option}: arithmetic needs labelled images (digits, shapes, or a folder with one subfolder "
                     "per class)")
    classes = [i for i, cls in enumerate(data.class_names) if cls == name or name in cls.split()]
    if not classes:
        parser.error(f"{option}: unknown class {name!r}; known: {', '.join(data.class_names)}")
    mask = torch.isin(data.labels, torch.tensor(classes))
    if not mask.any():
        parser.error(f"{option}: no images of class {name!r} in the data")
    return mask.nonzero().flatten()


def sample_main(argv: list[str]) -> int:
    parser = _sample_parser()
    args = parser.parse_args(argv)
    check_positive(parser, args, "n", "steps")
    if args.mode == "interpolate" and args.steps < 2:
        parser.error("--steps must be >= 2 for interpolate")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.backend:
        genfast.set_backend(args.backend)
    try:
        model, meta = load_vae(args.ckpt, device)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--ckpt: {exc}")
    cfg = model.config
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        if args.mode == "prior":
            grid, nrow = model.sample(args.n, generator=g), None
        else:
            data = _load_data(parser, args.data or meta["data"], cfg.image_size, cfg.channels, meta.get("seed", 0))
            grid, nrow = _data_mode(parser, args, model, data, g, device)
    path = save_image_grid(grid, args.out, nrow=nrow)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _data_mode(parser, args, model: VAE, data: ImageData, g: torch.Generator, device) -> tuple[torch.Tensor, int]:
    images = data.images
    if args.mode == "reconstruct":
        x = images[torch.randperm(len(images), generator=g)[:args.n]].to(device)
        return _pairs_in_rows(x, model.reconstruct(x)), 8
    if args.mode == "interpolate":
        if len(images) < 2:
            parser.error("--data: interpolate needs at least 2 images")
        index = torch.randperm(len(images), generator=g)
        rows = min(args.n, len(images) // 2)
        x1, x2 = images[index[:rows]].to(device), images[index[rows:2 * rows]].to(device)
        return model.interpolate(x1, x2, args.steps).flatten(0, 1), args.steps
    # arithmetic: rows of (images without the attribute, their reconstructions, + vector) and the same for the
    # images with it, minus the vector.
    names = data.class_names
    default_with, default_without = ("red", "blue") if any("red" in n.split() for n in names) else (
        names[:2] if len(names) >= 2 else (None, None))
    name_with = args.attribute_with or default_with
    name_without = args.attribute_without or default_without
    if name_with is None or name_without is None:
        parser.error("arithmetic needs --attribute-with and --attribute-without (the data has < 2 classes)")
    with_idx = _class_indices(parser, data, name_with, "--attribute-with")
    without_idx = _class_indices(parser, data, name_without, "--attribute-without")
    vector = model.attribute_vector(images[with_idx].to(device), images[without_idx].to(device))
    shown_without = images[without_idx[torch.randperm(len(without_idx), generator=g)[:8]]].to(device)
    shown_with = images[with_idx[torch.randperm(len(with_idx), generator=g)[:8]]].to(device)
    rows = [shown_without, model.reconstruct(shown_without), model.add_attribute(shown_without, vector, args.scale),
            shown_with, model.reconstruct(shown_with), model.add_attribute(shown_with, vector, -args.scale)]
    per_row = min(len(shown_without), len(shown_with))
    return torch.cat([r[:per_row] for r in rows]), per_row
