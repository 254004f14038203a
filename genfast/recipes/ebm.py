"""`genfast train ebm` and `genfast sample ebm`: an energy-based model of images (genfast/models/ebm.py), trained by
contrastive divergence with Langevin chains continued from a replay buffer.

    genfast train ebm --out runs/ebm                        # digits, 16x16 grayscale, offline
    genfast train ebm --data shapes --channels 3            # or --data DIR: a folder of images
    genfast sample ebm --ckpt runs/ebm --out ebm.png        # 64 images: buffer chains run 60 more steps
    genfast sample ebm --ckpt runs/ebm --chain --out chain.png   # each row one chain, noise -> image

Every --sample-every steps and at the end, <out>/samples/ gets two grids: ``buffer_<step>.png`` (the first images
of the replay buffer: what training's chains have reached) and ``chains_<step>.png`` (fresh chains from uniform
noise, --sample-steps steps: what the energy alone can make). The replay buffer is part of the checkpoint.
"""

from __future__ import annotations

import argparse

import torch

from genfast.models.ebm import EBM, EBMConfig, contrastive_divergence_loss
from genfast.recipes._common import (
    add_grid_args,
    add_sample_args,
    backend_errors,
    load_or_exit,
    sample_device,
    write_grid,
)
from genfast.recipes._gan import load_image_data, real_images
from genfast.training import (
    CommandParser,
    TrainTask,
    add_train_args,
    mark_fixed,
    non_negative_float,
    positive_int,
    start_run,
)

OPS = ("langevin_step",)


def _chain_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The Langevin noise and buffer draws of one training step: a pure function of (seed, step, rank), so that a
    resumed run draws exactly what the uninterrupted one did."""
    return torch.Generator(device).manual_seed(((seed * 1_000_003 + step) * 4099 + rank) & (2**63 - 1))


class EBMTask(TrainTask):
    def __init__(self, run, config: EBMConfig, data):
        self.run, self.config, args = run, config, run.args
        self.model = EBM(config).to(run.device)
        self.modules = {"model": self.model}  # the replay buffer is a module buffer: saved with the weights
        self.optimizers = {"model": torch.optim.Adam(self.model.net.parameters(), lr=args.lr, betas=(0.0, 0.999))}
        # DDP wraps the energy net only: the Langevin chains differentiate the raw net with respect to the images,
        # which DDP's gradient hooks must not see; each rank keeps its own replay buffer.
        self.energy = run.dist.wrap(self.model.net)
        self.real = real_images(data.images, None, run)
        self.log_every = 10
        fixed = torch.Generator(run.device).manual_seed(args.seed)
        self.eval_start = torch.rand(args.n_samples, config.channels, config.image_size, config.image_size,
                                     generator=fixed, device=run.device) * 2 - 1

    def config_dict(self) -> dict:
        a = self.run.args
        return {"model": self.config.to_dict(), "langevin_steps": a.langevin_steps, "alpha": a.alpha}

    def train_step(self, step: int) -> dict:
        run, args = self.run, self.run.args
        positives, _ = self.real(step, args.batch_size)
        chains = _chain_generator(args.seed, step, run.dist.rank, run.device)
        negatives = self.model.negatives(positives.shape[0], args.langevin_steps, generator=chains)
        with run.autocast():
            energies = self.energy(torch.cat([positives, negatives])).squeeze(1)
        loss, stats = contrastive_divergence_loss(energies, args.alpha)
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.detach(), **stats}

    def _grids(self, name: str) -> None:
        if not self.run.dist.is_main:
            return
        args, model = self.run.args, self.model
        self.run.save_grid(model.replay[:args.n_samples], self.run.samples_dir / f"buffer_{name}.png")
        was = model.training
        model.eval()
        try:
            fresh = model.langevin(self.eval_start, args.sample_steps,
                                   generator=torch.Generator(self.run.device).manual_seed(args.seed))
        finally:
            model.train(was)
        self.run.save_grid(fresh, self.run.samples_dir / f"chains_{name}.png")

    def evaluate(self, step: int) -> bool:
        self._grids(f"{step:06d}")
        return False

    def finish(self, step: int, completed: bool) -> None:
        self._grids("final")


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="genfast train ebm", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, recipe="ebm", steps=1000, batch_size=32, lr=1e-3, ops=OPS)
    parser.add_argument("--data", default="digits",
                        help="'digits' (scikit-learn's), 'shapes' (generated) or a folder of images (default digits)")
    # 16x16 by default: the digits are 8x8 scans, and each training step runs --langevin-steps forward and
    # backward passes of the energy net, so the image size sets the CPU time.
    parser.add_argument("--image-size", type=int, default=16, choices=(16, 32, 64))
    parser.add_argument("--channels", type=int, default=None, choices=(1, 3),
                        help="1 (grayscale) or 3 (RGB); default 1 for digits, 3 otherwise")
    parser.add_argument("--features", type=positive_int, default=16, help="width of the energy net (default 16)")
    parser.add_argument("--buffer-size", type=positive_int, default=8192, help="replay-buffer images (default 8192)")
    parser.add_argument("--langevin-steps", type=positive_int, default=20,
                        help="Langevin steps of each training chain (default 20)")
    parser.add_argument("--step-size", type=non_negative_float, default=10.0,
                        help="Langevin step size on the clipped energy gradient (default 10)")
    parser.add_argument("--noise-scale", type=non_negative_float, default=0.005,
                        help="standard deviation of each Langevin step's noise (default 0.005)")
    parser.add_argument("--alpha", type=non_negative_float, default=0.1,
                        help="weight of the energy-magnitude regulariser (default 0.1)")
    parser.add_argument("--n-samples", type=positive_int, default=64, help="images in each sample grid (default 64)")
    parser.add_argument("--sample-steps", type=positive_int, default=60,
                        help="Langevin steps of the fresh chains in the sample grids (default 60)")
    mark_fixed(parser, "--data", "--image-size", "--channels", "--features")
    return parser


def train_main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    with start_run(parser, args, recipe="ebm", ops=OPS) as run:
        try:
            if run.resuming:
                config = EBMConfig.from_dict(run.saved_config["model"])
            else:
                channels = args.channels or (1 if args.data == "digits" else 3)
                config = EBMConfig(image_size=args.image_size, channels=channels, features=args.features,
                                   buffer_size=args.buffer_size, step_size=args.step_size,
                                   noise_scale=args.noise_scale)
        except ValueError as exc:
            parser.error(str(exc))
        if args.batch_size // run.dist.world_size > config.buffer_size:
            parser.error(f"--batch-size {args.batch_size} needs a --buffer-size of at least that many images")
        data = load_image_data(parser, args.data, config.image_size, config.channels, args.seed)
        return run.train(EBMTask(run, config, data))


def sample_main(argv: list[str]) -> int:
    parser = CommandParser(prog="genfast sample ebm", description="Write a PNG grid of EBM samples (Langevin chains).")
    add_sample_args(parser, ops=OPS)
    parser.add_argument("--n", type=positive_int, default=None,
                        help="number of images, or of chains with --chain (default 64, or 8 with --chain)")
    parser.add_argument("--steps", type=positive_int, default=60, help="Langevin steps (default 60)")
    parser.add_argument("--start", choices=("buffer", "noise"), default="buffer",
                        help="start the chains from the checkpoint's replay buffer (default) or from uniform noise")
    parser.add_argument("--chain", action="store_true",
                        help="one row per chain, its state every --steps/10 steps from the start (noise -> image)")
    add_grid_args(parser, out="ebm_samples.png", scale=2)
    args = parser.parse_args(argv)
    device = sample_device(parser, args, OPS)
    model = load_or_exit(parser, lambda: EBM.from_checkpoint(args.ckpt, device,
                                                                allow_nonfinite=args.allow_nonfinite)).eval()
    n = args.n or (8 if args.chain else 64)
    if args.start == "buffer" and n > model.config.buffer_size:
        parser.error(f"--n {n}: the checkpoint's replay buffer holds {model.config.buffer_size} images")
    gen = torch.Generator(device).manual_seed(args.seed)
    start, _ = model.initial_chains(n, generator=gen, from_buffer=args.start == "buffer")
    source = "the replay buffer" if args.start == "buffer" else "uniform noise"
    if args.chain:
        every = max(1, args.steps // 10)
        _, states = backend_errors(parser, lambda: model.langevin(start, args.steps, generator=gen,
                                                                  trajectory_every=every))
        images = torch.stack(states, dim=1).flatten(0, 1)  # row i: chain i's states in order
        legend = (f"each row one chain from {source}: its start, then every {every} Langevin steps to step "
                  f"{every * (len(states) - 1)}")
        nrow = len(states)
    else:
        images = backend_errors(parser, lambda: model.langevin(start, args.steps, generator=gen))
        legend = f"{n} samples: chains from {source} after {args.steps} Langevin steps (--seed {args.seed})"
        nrow = None
    write_grid(parser, images, args.out, nrow=nrow, scale=args.scale, legend=legend)
    return 0
