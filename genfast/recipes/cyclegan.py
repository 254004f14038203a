"""`genfast train cyclegan` and `genfast sample cyclegan`: unpaired translation between two image domains.

    genfast train cyclegan --steps 2000 --out runs/cyclegan                 # built-in circles (A) <-> squares (B)
    genfast train cyclegan --data-a photos/ --data-b paintings/ --image-size 256 --ngf 64 --n-residual 9
    genfast sample cyclegan --ckpt runs/cyclegan --input a --direction a2b --out grid.png
    genfast sample cyclegan --ckpt runs/cyclegan --input my_photos/ --direction a2b --out grid.png

Training writes <out>/checkpoint (atomic; --resume continues exactly: weights, optimizers, both image pools and
their generators), and every --sample-every steps <out>/samples/step_<N>.png with four rows: real A, A->B, real B,
B->A. Under torchrun each process takes its slice of every global batch (DDP) and keeps its own image pools.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.distributed as torch_dist

import genfast
from genfast.data.images import ImageData, batch_indices, image_folder, shape_domains
from genfast.models.cyclegan import (
    CycleGAN,
    CycleGANConfig,
    ImagePool,
    PatchDiscriminator,
    discriminator_losses,
    generator_losses,
)
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

DIRECTIONS = ("a2b", "b2a")
DOMAIN_SIZE = 1024  # images per built-in domain
SHOWN = 8           # images per row of the sample grids


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genfast train cyclegan",
                                     description="Train a CycleGAN between two image folders (default: the "
                                                 "built-in circles and squares).")
    add_common_train_args(parser, steps=2000, batch_size=4, lr=2e-4, out="runs/cyclegan")
    parser.add_argument("--data-a", type=Path, default=None, help="folder of domain A images (with --data-b)")
    parser.add_argument("--data-b", type=Path, default=None, help="folder of domain B images (with --data-a)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="resize (centre crop) every image to this square size; default: 32 for the built-in "
                             "domains, and for folders their images' own size, which must then be the same")
    parser.add_argument("--ngf", type=int, default=32, help="generator width (the paper: 64)")
    parser.add_argument("--ndf", type=int, default=32, help="discriminator width (the paper: 64)")
    parser.add_argument("--n-residual", type=int, default=6, help="residual blocks (the paper: 9 at 256x256)")
    parser.add_argument("--disc-layers", type=int, default=3, help="PatchGAN strided layers (3: 70x70 patches)")
    parser.add_argument("--lambda-cycle", type=float, default=10.0)
    parser.add_argument("--lambda-identity", type=float, default=0.5, help="relative to --lambda-cycle")
    parser.add_argument("--pool-size", type=int, default=50, help="image pool size (0: no pool)")
    return parser


def load_domains(parser: argparse.ArgumentParser, data_a: Path | None, data_b: Path | None,
                 image_size: int | None, seed: int) -> tuple[ImageData, ImageData]:
    """Both domains as RGB images of one size; parser.error with the reason otherwise."""
    if (data_a is None) != (data_b is None):
        parser.error("--data-a and --data-b go together (or neither, for the built-in circles and squares)")
    if data_a is None:
        return shape_domains(DOMAIN_SIZE, image_size or 32, seed=seed)
    domains = []
    for option, folder in (("--data-a", data_a), ("--data-b", data_b)):
        try:
            domains.append(image_folder(folder, image_size, 3))
        except (ValueError, FileNotFoundError, ImportError) as exc:
            parser.error(f"{option}: {exc}")
    a, b = domains
    if a.images.shape[2:] != b.images.shape[2:]:
        parser.error(f"--data-a images are {a.images.shape[3]}x{a.images.shape[2]} but --data-b images are "
                     f"{b.images.shape[3]}x{b.images.shape[2]}; pass --image-size to resize both")
    return a, b


def _check_image_size(parser, config: CycleGANConfig, height: int, width: int) -> None:
    multiple = 2 ** config.n_downsample
    if height % multiple or width % multiple:
        parser.error(f"images are {width}x{height}: height and width must be multiples of {multiple}; "
                     "pass --image-size")
    minimum = PatchDiscriminator(config).min_size()
    if min(height, width) < minimum:
        parser.error(f"images are {width}x{height}: the PatchGAN with --disc-layers {config.disc_layers} needs at "
                     f"least {minimum}x{minimum} (pass --image-size or fewer --disc-layers)")


def train_main(argv: list[str]) -> int:
    parser = _train_parser()
    args = parser.parse_args(argv)
    check_positive(parser, args, "steps", "batch_size", "lr", "save_every", "sample_every", "ngf", "ndf",
                   "disc_layers")
    if args.image_size is not None and args.image_size <= 0:
        parser.error(f"--image-size must be > 0, got {args.image_size}")
    if args.pool_size < 0:
        parser.error(f"--pool-size must be >= 0, got {args.pool_size}")
    try:
        config = CycleGANConfig(channels=3, ngf=args.ngf, ndf=args.ndf, n_residual=args.n_residual,
                                disc_layers=args.disc_layers, lambda_cycle=args.lambda_cycle,
                                lambda_identity=args.lambda_identity)
    except ValueError as exc:
        parser.error(str(exc))
    domain_a, domain_b = load_domains(parser, args.data_a, args.data_b, args.image_size, args.seed)
    _check_image_size(parser, config, *domain_a.images.shape[2:])
    meta = {"model": "cyclegan", "config": config.to_dict(), "image_size": list(domain_a.images.shape[2:]),
            "data_a": str(args.data_a) if args.data_a else "circles", "pool_size": args.pool_size,
            "data_b": str(args.data_b) if args.data_b else "squares", "seed": args.seed}
    ckpt_dir = args.out / "checkpoint"
    if args.resume:
        found = find_checkpoint(ckpt_dir)
        if found is None:
            parser.error(f"--resume: no checkpoint in {args.out}")
        _, saved = load_checkpoint(found)
        for key in ("model", "config", "image_size", "pool_size"):
            if saved.get(key) != meta[key]:
                parser.error(f"--resume: the checkpoint in {args.out} has {key} = {saved.get(key)}, this run "
                             f"{meta[key]}; pass the same options")
    dist = start_run(args)
    try:
        if args.batch_size % dist.world_size:
            parser.error(f"--batch-size {args.batch_size} must divide by the {dist.world_size} processes")
        return _train(args, config, domain_a, domain_b, meta, dist)
    finally:
        dist.close()


def _pool_generator(seed: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 7919 + 104_729 + rank)


def _gather(value, dist) -> list:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not dist.enabled:
        return [value]
    out = [None] * dist.world_size
    torch_dist.all_gather_object(out, value)
    return out


def _train(args, config: CycleGANConfig, domain_a: ImageData, domain_b: ImageData, meta: dict, dist) -> int:
    device = dist.device
    model = CycleGAN(config).to(device)
    opt_g = torch.optim.Adam(model.generators.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(model.discriminators.parameters(), lr=args.lr, betas=(0.5, 0.999))
    pools = [ImagePool(args.pool_size, _pool_generator(args.seed, dist.rank)) for _ in range(2)]
    modules = {"generators": model.generators, "discriminators": model.discriminators}
    ckpt_dir, samples_dir = args.out / "checkpoint", args.out / "samples"
    step = 0
    if args.resume:
        state, _ = load_checkpoint(ckpt_dir, modules=modules, map_location=device)
        opt_g.load_state_dict(state["opt_g"])
        opt_d.load_state_dict(state["opt_d"])
        step = int(state["step"])
        restore_rng_state(state["rng"])
        if len(state["pools"]) == dist.world_size:
            for pool, pool_state in zip(pools, state["pools"][dist.rank]):
                pool.load_state_dict(pool_state, device)
        elif dist.is_main:
            print(f"note: the checkpoint's image pools come from {len(state['pools'])} processes, this run has "
                  f"{dist.world_size}: starting with empty pools", file=sys.stderr)
    gens, discs = dist.wrap(model.generators), dist.wrap(model.discriminators)
    images_a, images_b = domain_a.images, domain_b.images
    shown_a, shown_b = images_a[:SHOWN].to(device), images_b[:SHOWN].to(device)

    def save() -> None:
        pool_states = _gather([pool.state_dict() for pool in pools], dist)
        if dist.is_main:
            save_checkpoint(ckpt_dir, modules=modules, config=meta,
                            trainer_state={"step": step, "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                                           "pools": pool_states, "rng": capture_rng_state()})
        dist.barrier()

    def sample_grid(path: Path) -> None:
        model.eval()
        with torch.no_grad():
            grid = torch.cat([shown_a, model.translate_a_to_b(shown_a), shown_b, model.translate_b_to_a(shown_b)])
        model.train()
        save_image_grid(grid, path, nrow=shown_a.shape[0])

    bar = progress_bar(args.steps, initial=step, desc="cyclegan", enabled=dist.is_main and not args.quiet)
    with StopOnInterrupt() as stop:
        while step < args.steps:
            g = batch_generator(args.seed, step)
            real_a = dist.shard(images_a[batch_indices(len(images_a), args.batch_size, g)]).to(device)
            real_b = dist.shard(images_b[batch_indices(len(images_b), args.batch_size, g)]).to(device)

            # Generators: the discriminators are frozen and called unwrapped (they are not DDP's to reduce here).
            model.discriminators.requires_grad_(False)
            with autocast(device):
                outputs = gens(real_a, real_b)
                g_losses = generator_losses(model.discriminators, outputs, real_a, real_b, config)
            opt_g.zero_grad(set_to_none=True)
            g_losses["loss"].backward()
            opt_g.step()
            model.discriminators.requires_grad_(True)

            # Discriminators: real images against fakes from the history pools.
            fake_a, fake_b = pools[0].query(outputs["fake_a"]), pools[1].query(outputs["fake_b"])
            with autocast(device):
                d_losses = discriminator_losses(discs, real_a, real_b, fake_a, fake_b)
            opt_d.zero_grad(set_to_none=True)
            d_losses["loss"].backward()
            opt_d.step()
            step += 1

            figures = {"G": g_losses["loss"].item(), "cyc": g_losses["cycle"].item(), "D": d_losses["loss"].item()}
            if not all(math.isfinite(v) for v in figures.values()):
                print(f"genfast train cyclegan: losses {figures} at step {step}; stopping (lower --lr?)",
                      file=sys.stderr)
                return 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in figures.items()})
            stopping = dist.any(stop.requested)
            if checkpoint_and_sample(step, args, dist, stopping=stopping, save=save, sample_grid=sample_grid,
                                     samples_dir=samples_dir):
                break
    bar.close()
    if dist.is_main and step >= args.steps:
        sample_grid(args.out / "samples.png")
        print(f"checkpoint: {ckpt_dir}\nsamples: {args.out / 'samples.png'}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------------- sample
def _sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genfast sample cyclegan",
                                     description="Translate images with a trained CycleGAN.")
    parser.add_argument("--ckpt", type=Path, required=True, help="the --out folder of training, or its checkpoint")
    parser.add_argument("--input", required=True,
                        help="a folder of images, or 'a' / 'b' for fresh images of the built-in domains")
    parser.add_argument("--direction", default="a2b", choices=DIRECTIONS)
    parser.add_argument("--n", type=int, default=16, help="images to translate (default 16)")
    parser.add_argument("--out", type=Path, default=Path("cyclegan_samples.png"),
                        help="PNG grid: rows of inputs, each followed by the row of their translations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default=None, choices=genfast.BACKENDS)
    return parser


def load_cyclegan(ckpt: Path, device: torch.device | str = "cpu") -> tuple[CycleGAN, dict]:
    """The CycleGAN of a checkpoint folder (the training --out folder or its checkpoint/) and its metadata."""
    directory, meta = checkpoint_config(ckpt, "cyclegan", "CycleGAN")
    model = CycleGAN(CycleGANConfig(**meta["config"]))
    load_checkpoint(directory, modules={"generators": model.generators, "discriminators": model.discriminators})
    return model.to(device).eval(), meta


def sample_main(argv: list[str]) -> int:
    parser = _sample_parser()
    args = parser.parse_args(argv)
    check_positive(parser, args, "n")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.backend:
        genfast.set_backend(args.backend)
    try:
        model, meta = load_cyclegan(args.ckpt, device)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--ckpt: {exc}")
    height, width = meta["image_size"]
    if args.input.lower() in ("a", "b"):
        # Fresh images (another seed than training's) of the built-in domain.
        a, b = shape_domains(args.n, height, seed=meta.get("seed", 0) + 1000 + args.seed)
        images = (a if args.input.lower() == "a" else b).images
    else:
        try:
            images = image_folder(args.input, height if height == width else None, 3, max_images=args.n).images
        except (ValueError, FileNotFoundError, ImportError) as exc:
            parser.error(f"--input: {exc}")
        if tuple(images.shape[2:]) != (height, width):
            parser.error(f"--input: images are {images.shape[3]}x{images.shape[2]}, the model was trained on "
                         f"{width}x{height}")
    images = images[:args.n].to(device)
    translate = model.translate_a_to_b if args.direction == "a2b" else model.translate_b_to_a
    with torch.no_grad():
        translated = translate(images)
    rows = []
    for start in range(0, images.shape[0], SHOWN):
        rows += [images[start:start + SHOWN], translated[start:start + SHOWN]]
    path = save_image_grid(torch.cat(rows), args.out, nrow=min(SHOWN, images.shape[0]))
    print(f"wrote {path}", file=sys.stderr)
    return 0
