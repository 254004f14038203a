"""The adversarial training step the GAN recipes share (numbergan, dcgan, cgan), as a genfast.training.TrainTask.

One step (Goodfellow et al.'s non-saturating form, as in the DCGAN paper):
    D: minimise BCE(D(x_real), 1) + BCE(D(G(z).detach()), 0)      real and fake as separate batches (BatchNorm)
    G: minimise BCE(D(G(z)), 1) [+ generator_penalty(G(z))]         the same fakes, through the updated D
Resume is exact for a single process: the real batch of step s is a pure function of (seed, s) and the noise
comes from the global RNG, whose state every checkpoint stores (the loop restores it). Under DDP the global batch
of step s is the same and each rank takes its slice.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from genfast.training import Run, TrainTask, positive_int, probability


def add_gan_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--beta1", type=probability, default=0.5, help="Adam beta1 (default 0.5, as in DCGAN)")
    parser.add_argument("--beta2", type=probability, default=0.999, help="Adam beta2 (default 0.999)")


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits, target, dtype=torch.float32))


class GANTask(TrainTask):
    """A generator and a discriminator trained against each other.

    real(step, batch) -> (x_real, extra): this rank's real batch of ``step`` and the conditioning tensors passed to
        both networks after the sample (``()`` or ``(labels,)``).
    fake(G, batch, extra) -> what D sees of G's output for a batch of fresh noise (G may be DDP-wrapped).
    evaluate(step) -> bool: every --sample-every steps and the last, on every rank (write files on the main rank
        only); True stops training early (every rank must return the same).
    finish(step, completed): after training (the final grid).
    generator_penalty(x_fake, extra) -> a scalar added to G's loss (e.g. the cGAN's mode-seeking term), shown as
        "div" in the progress bar; None for none.
    """

    def __init__(self, run: Run, generator: nn.Module, discriminator: nn.Module, model_config: dict, *,
                 real: Callable, fake: Callable, evaluate: Callable[[int], bool],
                 finish: Callable[[int, bool], None] = lambda step, completed: None,
                 extras: dict | None = None, state: Callable[[], dict] = dict,
                 load_state: Callable[[dict], None] = lambda state: None,
                 generator_penalty: Callable[[torch.Tensor, tuple], torch.Tensor] | None = None):
        self.run = run
        device = run.device
        self.G, self.D = generator.to(device), discriminator.to(device)
        betas = (run.args.beta1, run.args.beta2)
        self.modules = {"generator": self.G, "discriminator": self.D}
        self.optimizers = {"generator": torch.optim.Adam(self.G.parameters(), lr=run.args.lr, betas=betas),
                           "discriminator": torch.optim.Adam(self.D.parameters(), lr=run.args.lr, betas=betas)}
        self.Gw, self.Dw = run.dist.wrap(self.G), run.dist.wrap(self.D)
        self.model_config, self.extras = model_config, extras or {}
        self.per_rank = run.args.batch_size // run.dist.world_size
        self._real, self._fake, self._evaluate, self._finish = real, fake, evaluate, finish
        self._state, self._load_state = state, load_state
        self._penalty = generator_penalty

    def config_dict(self) -> dict:
        return {"model": self.model_config, **self.extras}

    def train_step(self, step: int) -> dict:
        x_real, extra = self._real(step, self.per_rank)
        opt_g, opt_d = self.optimizers["generator"], self.optimizers["discriminator"]
        with self.run.autocast():
            x_fake = self._fake(self.Gw, self.per_rank, extra)
            loss_d = _bce(self.Dw(x_real, *extra), 1.0) + _bce(self.Dw(x_fake.detach(), *extra), 0.0)
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        with self.run.autocast():
            loss_g = _bce(self.Dw(x_fake, *extra), 1.0)
            penalty = self._penalty(x_fake, extra) if self._penalty is not None else None
        opt_g.zero_grad(set_to_none=True)
        (loss_g if penalty is None else loss_g + penalty).backward()
        opt_g.step()
        metrics = {"D": loss_d.detach(), "G": loss_g.detach()}
        if penalty is not None:
            metrics["div"] = penalty.detach()
        return metrics

    def evaluate(self, step: int) -> bool:
        return self._evaluate(step)

    def finish(self, step: int, completed: bool) -> None:
        self._finish(step, completed)

    def state_dict(self) -> dict:
        return self._state()

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._load_state(state)


def mode_seeking_penalty(images: torch.Tensor, z: torch.Tensor, labels: torch.Tensor,
                         eps: float = 1e-5) -> torch.Tensor:
    """The mode-seeking term of MSGAN (Mao et al., 2019) for a conditional generator: 1 / (r + eps), where r is the
    mean, over pairs of samples of the same class in the batch, of mean |x_i - x_j| / mean |z_i - z_j|. Minimising
    it makes different latents of one class give different images: the cure for a generator that draws one image
    per class. images [B, ...], z [B, nz], labels [B]; 0 when no two samples share a class."""
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    if not bool(same.any()):
        return images.new_zeros((), dtype=torch.float32)
    x, z = images.flatten(1).float(), z.flatten(1).float()
    dx = torch.cdist(x, x, p=1)[same] / x.shape[1]
    dz = torch.cdist(z, z, p=1)[same] / z.shape[1]
    return 1.0 / ((dx / dz).mean() + eps)


# ------------------------------------------------------------------------------------------- image GANs
def add_image_args(parser: argparse.ArgumentParser, *, data: str) -> None:
    """--data --image-size --channels --latent-dim --g-features --d-features --n-samples."""
    parser.add_argument("--data", default=data,
                        help=f"'digits' (scikit-learn's), 'shapes' (generated) or a folder of images (default {data})")
    parser.add_argument("--image-size", type=int, default=32, choices=(32, 64))
    parser.add_argument("--channels", type=int, default=None, choices=(1, 3),
                        help="1 (grayscale) or 3 (RGB); default 1 for digits, 3 otherwise")
    parser.add_argument("--latent-dim", type=positive_int, default=100)
    parser.add_argument("--g-features", type=positive_int, default=64, help="generator width (DCGAN's ngf)")
    parser.add_argument("--d-features", type=positive_int, default=64, help="discriminator width (DCGAN's ndf)")
    parser.add_argument("--n-samples", type=positive_int, default=64, help="images in each sample grid")


def load_image_data(parser: argparse.ArgumentParser, source: str, image_size: int, channels: int, seed: int):
    """genfast.data.images.load_images, with a bad --data reported as a command-line error."""
    from genfast.data.images import load_images

    try:
        return load_images(source, image_size, channels, seed=seed)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        parser.error(f"--data {source}: {exc}")


def real_images(images: torch.Tensor, labels: torch.Tensor | None, run: Run):
    """GANTask's ``real`` for image data: the global batch of a step drawn from (seed, step), this rank's slice."""
    from genfast.data.images import batch_indices
    from genfast.training import batch_generator

    def real(step: int, batch: int) -> tuple[torch.Tensor, tuple]:
        index = run.dist.shard(batch_indices(images.shape[0], run.args.batch_size,
                                             batch_generator(run.args.seed, step)))
        x = images[index].to(run.device, non_blocking=True)
        return x, (() if labels is None else (labels[index].to(run.device),))

    return real


def grid_writer(run: Run, draw: Callable[[], torch.Tensor], nrow: int | None = None):
    """(evaluate, finish) for an image GAN: the grid of ``draw()`` (G in eval mode, no grad) written to
    <out>/samples/step_<N>.png at each evaluation and <out>/samples/final.png at the end."""
    def write(name: str) -> None:
        if run.dist.is_main:
            run.save_grid(draw(), run.samples_dir / name, nrow=nrow)

    def evaluate(step: int) -> bool:
        write(f"step_{step:06d}.png")
        return False

    def finish(step: int, completed: bool) -> None:
        write("final.png")

    return evaluate, finish


def in_eval_mode(module: nn.Module, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        was = module.training
        module.eval()
        try:
            with torch.no_grad():
                return fn()
        finally:
            module.train(was)
    return call
