"""`genfast train cyclegan` and `genfast sample cyclegan`: unpaired translation between two image domains.

    genfast train cyclegan --steps 2000 --out runs/cyclegan                 # built-in circles (A) <-> squares (B)
    genfast train cyclegan --data-a photos/ --data-b paintings/ --image-size 256 --ngf 64 --n-residual 9
    genfast sample cyclegan --ckpt runs/cyclegan --input a --direction a2b --out grid.png
    genfast sample cyclegan --ckpt runs/cyclegan --input my_photos/ --direction a2b --out grid.png

Training writes the run folder: <out>/checkpoint (atomic; --resume continues exactly: weights, optimizers, both
image pools and their generators), and every --sample-every steps <out>/samples/step_<N>.png with four rows: real
A, A->B, real B, B->A (and <out>/samples/final.png at the end). Under torchrun each process takes its slice of
every global batch (DDP) and keeps its own image pools.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as torch_dist

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
    add_grid_args,
    add_sample_args,
    backend_errors,
    load_or_exit,
    sample_device,
    write_grid,
)
from genfast.training import (
    CommandParser,
    Run,
    TrainTask,
    add_train_args,
    batch_generator,
    mark_fixed,
    non_negative_float,
    non_negative_int,
    positive_int,
    start_run,
)

DIRECTIONS = ("a2b", "b2a")
DOMAIN_SIZE = 1024  # images per built-in domain
SHOWN = 8           # images per row of the sample grids
OPS = ("conv_transpose2d",)


def _train_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="genfast train cyclegan",
                           description="Train a CycleGAN between two image domains (default: the built-in circles "
                                       "and squares; or two folders, --data-a and --data-b).")
    add_train_args(parser, recipe="cyclegan", steps=2000, batch_size=4, lr=2e-4, ops=OPS)
    parser.add_argument("--data-a", type=Path, default=None, help="folder of domain A images (with --data-b)")
    parser.add_argument("--data-b", type=Path, default=None, help="folder of domain B images (with --data-a)")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="resize (centre crop) every image to this square size; default: 32 for the built-in "
                             "domains, and for folders their images' own size, which must then be the same")
    parser.add_argument("--ngf", type=positive_int, default=32, help="generator width (the paper: 64)")
    parser.add_argument("--ndf", type=positive_int, default=32, help="discriminator width (the paper: 64)")
    parser.add_argument("--n-residual", type=non_negative_int, default=6,
                        help="residual blocks (the paper: 9 at 256x256)")
    parser.add_argument("--disc-layers", type=positive_int, default=3,
                        help="PatchGAN strided layers (3: 70x70 patches)")
    parser.add_argument("--lambda-cycle", type=non_negative_float, default=10.0)
    parser.add_argument("--lambda-identity", type=non_negative_float, default=0.5, help="relative to --lambda-cycle")
    parser.add_argument("--pool-size", type=non_negative_int, default=50, help="image pool size (0: no pool)")
    parser.add_argument("--input-skip", action=argparse.BooleanOptionalAction, default=True,
                        help="the generators' last layer also sees the input image, which carries its colours to "
                             "the output (default on; --no-input-skip: the paper's generator, whose outputs on the "
                             "built-in shapes all came out one colour)")
    mark_fixed(parser, "--data-a", "--data-b", "--image-size", "--ngf", "--ndf", "--n-residual", "--disc-layers",
               "--input-skip")
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
    try:
        config = CycleGANConfig(channels=3, ngf=args.ngf, ndf=args.ndf, n_residual=args.n_residual,
                                disc_layers=args.disc_layers, lambda_cycle=args.lambda_cycle,
                                lambda_identity=args.lambda_identity, input_skip=args.input_skip)
    except ValueError as exc:
        parser.error(str(exc))
    with start_run(parser, args, recipe="cyclegan", ops=OPS) as run:
        domain_a, domain_b = load_domains(parser, args.data_a, args.data_b, args.image_size, args.seed)
        _check_image_size(parser, config, *domain_a.images.shape[2:])
        task = CycleGANTask(run, config, domain_a, domain_b)
        if run.resuming:
            saved = run.saved_config
            for key, value in (("model", config.to_dict()), *task.extras().items()):
                if key in ("model", "image_size", "pool_size") and saved.get(key) != value:
                    parser.error(f"--resume: the checkpoint in {args.out} has {key} = {saved.get(key)}, this run "
                                 f"{value}; pass the same options")
        return run.train(task)


def _pool_generator(seed: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 7919 + 104_729 + rank)


def _gather(value, dist) -> list:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not dist.enabled:
        return [value]
    out = [None] * dist.world_size
    torch_dist.all_gather_object(out, value)
    return out


class CycleGANTask(TrainTask):
    def __init__(self, run: Run, config: CycleGANConfig, domain_a: ImageData, domain_b: ImageData):
        self.run, self.config = run, config
        args, device = run.args, run.device
        self.model = model = CycleGAN(config).to(device)
        self.modules = {"generators": model.generators, "discriminators": model.discriminators}
        self.optimizers = {
            "generators": torch.optim.Adam(model.generators.parameters(), lr=args.lr, betas=(0.5, 0.999)),
            "discriminators": torch.optim.Adam(model.discriminators.parameters(), lr=args.lr, betas=(0.5, 0.999))}
        self.pools = [ImagePool(args.pool_size, _pool_generator(args.seed, run.dist.rank)) for _ in range(2)]
        self.gens, self.discs = run.dist.wrap(model.generators), run.dist.wrap(model.discriminators)
        self.images_a, self.images_b = domain_a.images, domain_b.images
        self.shown_a, self.shown_b = self.images_a[:SHOWN].to(device), self.images_b[:SHOWN].to(device)

    def extras(self) -> dict:
        args = self.run.args
        return {"image_size": list(self.images_a.shape[2:]), "pool_size": args.pool_size, "seed": args.seed,
                "data_a": str(args.data_a) if args.data_a else "circles",
                "data_b": str(args.data_b) if args.data_b else "squares"}

    def config_dict(self) -> dict:
        return {"model": self.config.to_dict(), **self.extras()}

    def train_step(self, step: int) -> dict:
        run, args, model = self.run, self.run.args, self.model
        g = batch_generator(args.seed, step)
        real_a = run.dist.shard(self.images_a[batch_indices(len(self.images_a), args.batch_size, g)]).to(run.device)
        real_b = run.dist.shard(self.images_b[batch_indices(len(self.images_b), args.batch_size, g)]).to(run.device)
        opt_g, opt_d = self.optimizers["generators"], self.optimizers["discriminators"]

        # Generators: the discriminators are frozen and called unwrapped (they are not DDP's to reduce here).
        model.discriminators.requires_grad_(False)
        with run.autocast():
            outputs = self.gens(real_a, real_b)
            g_losses = generator_losses(model.discriminators, outputs, real_a, real_b, self.config)
        opt_g.zero_grad(set_to_none=True)
        g_losses["loss"].backward()
        opt_g.step()
        model.discriminators.requires_grad_(True)

        # Discriminators: real images against fakes from the history pools.
        fake_a, fake_b = self.pools[0].query(outputs["fake_a"]), self.pools[1].query(outputs["fake_b"])
        with run.autocast():
            d_losses = discriminator_losses(self.discs, real_a, real_b, fake_a, fake_b)
        opt_d.zero_grad(set_to_none=True)
        d_losses["loss"].backward()
        opt_d.step()
        return {"G": g_losses["loss"].detach(), "cyc": g_losses["cycle"].detach(), "D": d_losses["loss"].detach()}

    def state_dict(self) -> dict:
        # Every rank keeps its own pools: gathered into the main rank's checkpoint (a collective: all ranks call).
        return {"pools": _gather([pool.state_dict() for pool in self.pools], self.run.dist)}

    def load_state_dict(self, state: dict) -> None:
        pools, dist = state.get("pools") or [], self.run.dist
        if len(pools) == dist.world_size:
            for pool, pool_state in zip(self.pools, pools[dist.rank]):
                pool.load_state_dict(pool_state, self.run.device)
        else:
            self.run.say(f"note: the checkpoint's image pools come from {len(pools)} processes, this run has "
                         f"{dist.world_size}: starting with empty pools")

    def _grid(self, path: Path) -> None:
        model = self.model
        model.eval()
        with torch.no_grad():
            grid = torch.cat([self.shown_a, model.translate_a_to_b(self.shown_a), self.shown_b,
                              model.translate_b_to_a(self.shown_b)])
        model.train()
        self.run.save_grid(grid, path, nrow=self.shown_a.shape[0])

    def evaluate(self, step: int) -> bool:
        if self.run.dist.is_main:
            self._grid(self.run.samples_dir / f"step_{step:06d}.png")
        return False

    def finish(self, step: int, completed: bool) -> None:
        if self.run.dist.is_main and completed:
            self._grid(self.run.samples_dir / "final.png")
            self.run.say(f"samples: {self.run.samples_dir / 'final.png'} (rows: real A, A->B, real B, B->A)")


# --------------------------------------------------------------------------------------------------- sample
def _sample_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="genfast sample cyclegan", description="Translate images with a trained CycleGAN.")
    add_sample_args(parser, ops=OPS)
    parser.add_argument("--input", required=True,
                        help="a folder of images, or 'a' / 'b' for fresh images of the built-in domains")
    parser.add_argument("--direction", default="a2b", choices=DIRECTIONS)
    parser.add_argument("--n", type=positive_int, default=16, help="images to translate (default 16)")
    add_grid_args(parser, out="cyclegan_samples.png")
    return parser


def load_cyclegan(ckpt, device: torch.device | str = "cpu", *, allow_nonfinite: bool = False) -> tuple[CycleGAN, dict]:
    """The CycleGAN of a run folder (the training --out folder or its checkpoint/) and its config.json."""
    from genfast.models._checkpoint import read_run

    model = CycleGAN.from_checkpoint(ckpt, device, allow_nonfinite=allow_nonfinite)
    return model, read_run(ckpt, "cyclegan")[1]


def sample_main(argv: list[str]) -> int:
    parser = _sample_parser()
    args = parser.parse_args(argv)
    device = sample_device(parser, args, OPS)
    model, meta = load_or_exit(parser, lambda: load_cyclegan(args.ckpt, device,
                                                                allow_nonfinite=args.allow_nonfinite))
    size = meta.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(type(v) is int and 0 < v <= 4096 for v in size)):
        parser.error(f"--ckpt: its config.json has no valid image_size (got {size!r})")
    height, width = size
    seed = meta.get("seed") if type(meta.get("seed")) is int else 0
    if args.input.lower() in ("a", "b"):
        # Fresh images (another seed than training's) of the built-in domain.
        a, b = shape_domains(args.n, height, seed=seed + 1000 + args.seed)
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
        translated = backend_errors(parser, lambda: translate(images))
    rows = []
    for start in range(0, images.shape[0], SHOWN):
        rows += [images[start:start + SHOWN], translated[start:start + SHOWN]]
    source, target = ("A", "B") if args.direction == "a2b" else ("B", "A")
    write_grid(parser, torch.cat(rows), args.out, nrow=min(SHOWN, images.shape[0]), scale=args.scale,
               legend=f"odd rows: input images ({source}); even rows: their translations {source}->{target}")
    return 0
