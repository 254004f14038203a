"""`genfast train realnvp` and `genfast sample realnvp`: a RealNVP normalizing flow (genfast/models/realnvp.py) on
2-D points (two moons, rings) or on the digits (dequantized 8-bit images, modelled exactly in bits per dimension).

    genfast train realnvp --data moons --out runs/realnvp-moons        # an MLP-coupling flow on 2-D points
    genfast train realnvp --data digits --out runs/realnvp             # multi-scale flow, 16x16 digits
    genfast sample realnvp --ckpt runs/realnvp --temperature 0.7 --out realnvp.png
    genfast sample realnvp --ckpt runs/realnvp-moons --out moons.png   # density picture: data | samples

Every --sample-every steps and at the end the run prints the held-out score: bits per dimension beside a per-pixel
Gaussian's for the digits (the last 10% of them, in an order fixed by the data), nats per point for the 2-D sets
(a fixed held-out draw); and it writes <out>/samples/step_<N>.png: a grid of samples, or for points a picture of
two histograms side by side, held-out data on the left and the flow's samples on the right.
"""

from __future__ import annotations

import argparse
import math

import torch

from genfast.data.images import batch_indices, load_images
from genfast.data.toy2d import TOY_DATASETS, toy_points
from genfast.models.realnvp import RealNVP, RealNVPConfig, dequantize, gaussian_bits_per_dim
from genfast.ops._checks import fits_in_memory
from genfast.recipes._common import add_grid_args, add_sample_args, load_or_exit, sample_device, write_grid
from genfast.training import (
    CommandParser,
    Run,
    TrainTask,
    add_train_args,
    batch_generator,
    non_negative_float,
    positive_int,
    resolve_device,
    start_run,
)
from genfast.training.budget import check_training_memory
from genfast.training.options import mark_fixed

OPS: tuple[str, ...] = ()  # plain PyTorch: the affine coupling is not fused (see the README's RealNVP section)
HELD_OUT = 0.1
HELD_OUT_POINTS = 4096
GRID_SIZE = 64
MAX_SAMPLES = 100_000
PICTURE = 96  # pixels per side of a density picture
LEVELS = 256  # the digits are treated as 8-bit images


def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices: a fixed permutation (seed 0, whatever --seed), the last 10% held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    cut = n - max(1, int(n * HELD_OUT))
    return order[:cut], order[cut:]


def density_picture(points: torch.Tensor, extent: float = 3.0, size: int = PICTURE) -> torch.Tensor:
    """[N, 2] points -> a [1, size, size] image in [-1, 1]: their 2-D histogram over [-extent, extent]^2 (y up),
    the brightness the square root of the count over the largest count."""
    p = points.detach().float().cpu()
    cols = ((p[:, 0] + extent) / (2 * extent) * size).floor().long()
    rows = ((extent - p[:, 1]) / (2 * extent) * size).floor().long()
    inside = (cols >= 0) & (cols < size) & (rows >= 0) & (rows < size)
    counts = torch.zeros(size * size).index_add_(0, rows[inside] * size + cols[inside], torch.ones(int(inside.sum())))
    image = (counts / counts.max().clamp_min(1)).sqrt().view(1, size, size)
    return image * 2 - 1


def _train_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="genfast train realnvp", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, recipe="realnvp", steps=1000, batch_size=32, lr=1e-3, ops=OPS, sample_every=500)
    parser.add_argument("--data", default="digits", choices=("digits", *TOY_DATASETS),
                        help="digits (default; 16x16 8-bit images), moons or rings (2-D points)")
    parser.add_argument("--image-size", type=int, default=16, choices=(8, 16, 32), help="digits: default 16")
    parser.add_argument("--hidden", type=positive_int, default=None,
                        help="coupling network width (default 64 for the digits, 128 for points)")
    parser.add_argument("--couplings", type=positive_int, default=8, help="points: coupling layers (default 8)")
    parser.add_argument("--scales", type=positive_int, default=2, help="digits: scales (default 2)")
    parser.add_argument("--noise", type=non_negative_float, default=0.05, help="points: their noise (default 0.05)")
    mark_fixed(parser, "--data", "--image-size", "--hidden", "--couplings", "--scales", "--noise")
    return parser


def _config(parser, args) -> RealNVPConfig:
    try:
        if args.data in TOY_DATASETS:
            return RealNVPConfig(kind="vector", dim=2, hidden=args.hidden or 128, couplings=args.couplings)
        return RealNVPConfig(kind="image", image_size=args.image_size, channels=1, hidden=args.hidden or 64,
                             scales=args.scales, levels=LEVELS)
    except ValueError as exc:
        parser.error(str(exc).replace("RealNVPConfig.", "--").replace("_", "-"))


def train_main(argv: list[str]) -> int:
    parser = _train_parser()
    args = parser.parse_args(argv)
    config = _config(parser, args)  # bad sizes are usage errors before the run folder is touched
    check_training_memory(parser, build=lambda: [RealNVP(config)], batch_size=args.batch_size,
                          forward_one=lambda m: m[0](torch.full((1, *config.data_shape), 0.5)),
                          model_flags=f"--hidden {config.hidden} --couplings {args.couplings} --scales {args.scales}",
                          device=resolve_device(parser, args.device))
    with start_run(parser, args, recipe="realnvp", ops=OPS) as run:
        config = _config(parser, args)
        if config.kind == "vector":
            return run.train(RealNVPTask(run, config, None))
        try:
            data = load_images("digits", config.image_size, 1)
        except (ValueError, ImportError) as exc:
            parser.error(f"--data digits: {exc}")
        return run.train(RealNVPTask(run, config, data.images))


class RealNVPTask(TrainTask):
    def __init__(self, run: Run, config: RealNVPConfig, images: torch.Tensor | None):
        self.run, self.config, args = run, config, run.args
        self.model = RealNVP(config).to(run.device)
        self.modules = {"model": self.model}
        self.optimizers = {"model": torch.optim.Adam(self.model.parameters(), lr=args.lr)}
        self.ddp = run.dist.wrap(self.model)
        self.log_every = 10
        fixed = torch.Generator().manual_seed(1_000_003)  # the held-out draw: the same for every --seed
        if images is None:
            self.train_images = None
            self.held = toy_points(args.data, HELD_OUT_POINTS, noise=args.noise, generator=fixed)
            self.baseline = None
        else:
            train, held = split(len(images))
            self.train_images = images[train]
            self.held = dequantize(images[held], LEVELS, generator=fixed)
            self.baseline = gaussian_bits_per_dim(dequantize(self.train_images, LEVELS, generator=fixed), self.held,
                                                  LEVELS)

    def config_dict(self) -> dict:
        return {"model": self.config.to_dict(), "data": self.run.args.data, "noise": self.run.args.noise,
                "baseline_bpd": self.baseline}

    def _batch(self, step: int) -> torch.Tensor:
        run, args = self.run, self.run.args
        gen = batch_generator(args.seed, step)
        if self.train_images is None:
            x = toy_points(args.data, args.batch_size, noise=args.noise, generator=gen)
        else:
            index = batch_indices(len(self.train_images), args.batch_size, gen)
            x = dequantize(self.train_images[index], LEVELS, generator=gen)  # fresh dequantization noise each step
        return run.dist.shard(x).to(run.device)

    def train_step(self, step: int) -> dict:
        x = self._batch(step)
        z, log_det = self.ddp(x)  # the flow in fp32: its log-determinants are sums over every dimension
        log_p = -0.5 * (z.float().square().sum(1) + z.shape[1] * math.log(2 * math.pi)) + log_det
        loss = -log_p.mean() / self.config.data_dim  # nats per dimension
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 100.0)  # an early exp(s) spike cannot blow up
        opt.step()
        return {"nats/dim": loss.detach()}

    @torch.no_grad()
    def _score(self) -> str:
        held = self.held.to(self.run.device)
        if self.config.kind == "vector":
            return f"held-out {float(-self.model.log_prob(held).mean()):.3f} nats per point"
        bpd = float(self.model.bits_per_dim(held).mean())
        return f"held-out bits/dim {bpd:.3f} (per-pixel Gaussian: {self.baseline:.3f})"

    @torch.no_grad()
    def _picture(self, name: str) -> None:
        gen = torch.Generator(self.run.device).manual_seed(self.run.args.seed)
        if self.config.kind == "vector":
            samples = self.model.sample(len(self.held), generator=gen)
            self.run.save_grid(torch.stack([density_picture(self.held), density_picture(samples)]),
                               self.run.samples_dir / name, nrow=2)
        else:
            self.run.save_grid(self.model.sample(GRID_SIZE, 0.7, generator=gen) * 2 - 1, self.run.samples_dir / name)

    def evaluate(self, step: int) -> bool:
        if self.run.dist.is_main:
            self.model.eval()
            try:
                self.run.say(f"step {step}: {self._score()}")
                self._picture(f"step_{step:06d}.png")
            finally:
                self.model.train()
        return False

    def finish(self, step: int, completed: bool) -> None:
        if self.run.dist.is_main and completed:
            self.model.eval()
            self._picture("final.png")
            self.model.train()
            self.run.say(f"samples: {self.run.samples_dir / 'final.png'}")


# --------------------------------------------------------------------------------------------------- sample
def sample_main(argv: list[str]) -> int:
    parser = CommandParser(prog="genfast sample realnvp", description="Samples of a trained RealNVP flow.")
    add_sample_args(parser, ops=OPS)
    parser.add_argument("--n", type=positive_int, default=None,
                        help=f"images (default {GRID_SIZE}) or points (default {HELD_OUT_POINTS}); at most "
                             f"{MAX_SAMPLES}")
    parser.add_argument("--temperature", type=non_negative_float, default=1.0,
                        help="z ~ N(0, temperature^2 I); below 1 trades variety for cleaner samples (default 1)")
    add_grid_args(parser, out="realnvp_samples.png", scale=2)
    args = parser.parse_args(argv)
    device = sample_device(parser, args, OPS)
    model = load_or_exit(parser, lambda: RealNVP.from_checkpoint(args.ckpt, device))
    cfg = model.config
    n = args.n or (HELD_OUT_POINTS if cfg.kind == "vector" else GRID_SIZE)
    if n > MAX_SAMPLES:
        parser.error(f"--n {n}: at most {MAX_SAMPLES}")
    try:  # z, the image and a few activations of the widest coupling network, in fp32
        fits_in_memory("genfast sample realnvp", "--n", n, n * cfg.data_dim * (4 + 2 * cfg.hidden) * 4, device)
    except ValueError as exc:
        parser.error(str(exc))
    gen = torch.Generator(device).manual_seed(args.seed)
    samples = model.sample(n, args.temperature, generator=gen)
    if cfg.kind == "vector":
        images, nrow = density_picture(samples)[None], 1
        legend = f"a histogram of {n} samples over [-3, 3]^2 (temperature {args.temperature:g}, --seed {args.seed})"
    else:
        images, nrow = samples * 2 - 1, None
        legend = f"{n} samples at temperature {args.temperature:g} (--seed {args.seed})"
    write_grid(parser, images, args.out, nrow=nrow, scale=args.scale, legend=legend)
    return 0
