"""The adversarial training loop the GAN recipes share (numbergan, dcgan, cgan).

Each recipe describes its model as a :class:`GANTask` (its two networks, how to draw a real batch, how to make
fakes, what to do at each evaluation) and calls :func:`train_gan`, which owns everything else: Adam for both
networks, the non-saturating GAN losses, the progress bar, atomic checkpoints with exact resume, Ctrl-C and DDP.

One step (Goodfellow et al.'s non-saturating form, as in the DCGAN paper):
    D: minimise BCE(D(x_real), 1) + BCE(D(G(z).detach()), 0)      real and fake as separate batches (BatchNorm)
    G: minimise BCE(D(G(z)), 1)                                     the same fakes, through the updated D
Resume is exact for a single process: the real batch of step s is a pure function of (seed, s) and the noise
comes from the global RNG, whose state every checkpoint stores. Under DDP the global batch of step s is the same
and each rank takes its slice; ranks other than 0 reseed their noise from (seed, rank, step) on resume.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from genfast.recipes._common import autocast
from genfast.training import (
    Distributed,
    StopOnInterrupt,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    progress_bar,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
)
from genfast.training.checkpoint import CONFIG_FILE


@dataclass
class GANTask:
    """What one GAN recipe contributes to the shared loop.

    real(step, batch) -> (x_real, extra): this rank's real batch of ``step`` and the conditioning tensors passed to
        both networks after the sample (``()`` or ``(labels,)``).
    fake(G, batch, extra) -> what D sees of G's output for a batch of fresh noise (G may be DDP-wrapped).
    evaluate(step, final) -> bool: called every --sample-every steps and at the end on every rank (write grids on
        the main rank only); True asks training to stop early (every rank must return the same).
    state / load_state: anything extra the task wants in the checkpoint (early-stopping counters).
    """

    name: str
    generator: nn.Module
    discriminator: nn.Module
    model_config: dict
    real: Callable[[int, int], tuple[torch.Tensor, tuple]]
    fake: Callable[[nn.Module, int, tuple], torch.Tensor]
    evaluate: Callable[[int, bool], bool]
    state: Callable[[], dict] = field(default=lambda: {})
    load_state: Callable[[dict], None] = field(default=lambda state: None)


def add_gan_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (default 0.5, as in DCGAN)")
    parser.add_argument("--beta2", type=float, default=0.999, help="Adam beta2 (default 0.999)")


def checkpoint_config(directory: Path, recipe: str) -> dict:
    """The config.json of the checkpoint at ``directory``, checked to come from ``recipe``."""
    found = find_checkpoint(directory)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {directory} (train one with `genfast train {recipe} --out DIR`)")
    try:
        config = json.loads((found / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{found / CONFIG_FILE} is not valid JSON: {exc}") from exc
    if config.get("recipe") != recipe or not isinstance(config.get("model"), dict):
        raise ValueError(f"{directory} holds a {config.get('recipe')!r} checkpoint, not a {recipe} one")
    return config


def _jsonable(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits, target, dtype=torch.float32))


def train_gan(args: argparse.Namespace, dist: Distributed, task: GANTask) -> int:
    """Train ``task`` for ``args.steps`` optimizer steps; returns the process exit status (0)."""
    device = dist.device
    G, D = task.generator.to(device), task.discriminator.to(device)
    betas = (args.beta1, args.beta2)
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=betas)
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr, betas=betas)
    modules = {"generator": G, "discriminator": D}
    config = {"recipe": task.name, "model": task.model_config, "args": _jsonable(args)}
    step = 0
    if args.resume:
        trainer, _ = load_checkpoint(args.out, modules=modules, map_location=device)
        opt_g.load_state_dict(trainer["opt_g"])
        opt_d.load_state_dict(trainer["opt_d"])
        step = int(trainer["step"])
        task.load_state(trainer.get("task", {}))
        if dist.is_main:
            restore_rng_state(trainer["rng"])
        else:
            seed_everything((args.seed * 1_000_003 + step) * 4099 + dist.rank)

    def save() -> None:
        if dist.is_main:
            trainer = {"step": step, "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                       "rng": capture_rng_state(), "task": task.state()}
            save_checkpoint(args.out, modules=modules, trainer_state=trainer, config=config)
        dist.barrier()

    per_rank = args.batch_size // dist.world_size
    Gw, Dw = dist.wrap(G), dist.wrap(D)
    bar = progress_bar(args.steps, initial=step, desc=f"train {task.name}", enabled=dist.is_main and not args.quiet)
    stopped_early = interrupted = False
    with StopOnInterrupt() as stop:
        while step < args.steps:
            x_real, extra = task.real(step, per_rank)
            with autocast(device):
                x_fake = task.fake(Gw, per_rank, extra)
                loss_d = _bce(Dw(x_real, *extra), 1.0) + _bce(Dw(x_fake.detach(), *extra), 0.0)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            with autocast(device):
                loss_g = _bce(Dw(x_fake, *extra), 1.0)
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            step += 1
            d_value, g_value = float(loss_d.detach()), float(loss_g.detach())
            if not (math.isfinite(d_value) and math.isfinite(g_value)):
                raise FloatingPointError(f"{task.name}: non-finite loss at step {step} (D {d_value}, G {g_value}); "
                                         "try a lower --lr")
            bar.update(1)
            bar.set_postfix(D=f"{d_value:.3f}", G=f"{g_value:.3f}")
            if step % args.sample_every == 0 or step == args.steps:
                stopped_early = task.evaluate(step, step == args.steps) and step < args.steps
            if step % args.save_every == 0 and step < args.steps and not stopped_early:
                save()
            interrupted = dist.any(stop.requested)
            if stopped_early or interrupted:
                break
        bar.close()
        if stopped_early or interrupted:
            task.evaluate(step, True)
        save()
    if dist.is_main and not args.quiet:
        why = " (stopped early)" if stopped_early else " (interrupted)" if interrupted else ""
        print(f"{task.name}: step {step}{why}; checkpoint in {args.out}")
    return 0


# ------------------------------------------------------------------------------------------- image GANs
def add_image_args(parser: argparse.ArgumentParser, *, data: str) -> None:
    """--data --image-size --channels --latent-dim --g-features --d-features --n-samples --samples-dir."""
    parser.add_argument("--data", default=data,
                        help=f"'digits' (scikit-learn's), 'shapes' (generated) or a folder of images (default {data})")
    parser.add_argument("--image-size", type=int, default=32, choices=(32, 64))
    parser.add_argument("--channels", type=int, default=None, choices=(1, 3),
                        help="1 (grayscale) or 3 (RGB); default 1 for digits, 3 otherwise")
    parser.add_argument("--latent-dim", type=int, default=100)
    parser.add_argument("--g-features", type=int, default=64, help="generator width (DCGAN's ngf)")
    parser.add_argument("--d-features", type=int, default=64, help="discriminator width (DCGAN's ndf)")
    parser.add_argument("--n-samples", type=int, default=64, help="images in each sample grid")
    parser.add_argument("--samples-dir", type=Path, default=None,
                        help="where the PNG sample grids go (default: <out>_samples)")


def load_image_data(parser: argparse.ArgumentParser, source: str, image_size: int, channels: int, seed: int):
    """genfast.data.images.load_images, with a bad --data reported as a command-line error."""
    from genfast.data.images import load_images

    try:
        return load_images(source, image_size, channels, seed=seed)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        parser.error(f"--data {source}: {exc}")


def samples_dir(args: argparse.Namespace) -> Path:
    # Not inside --out: the checkpoint directory is replaced as a whole at every save.
    return args.samples_dir or args.out.with_name(args.out.name + "_samples")


def real_images(images: torch.Tensor, labels: torch.Tensor | None, args: argparse.Namespace, dist: Distributed):
    """task.real for image data: the global batch of a step drawn from (seed, step), this rank's slice of it."""
    from genfast.data.images import batch_indices
    from genfast.training import batch_generator

    def real(step: int, batch: int) -> tuple[torch.Tensor, tuple]:
        index = dist.shard(batch_indices(images.shape[0], args.batch_size, batch_generator(args.seed, step)))
        x = images[index].to(dist.device, non_blocking=True)
        return x, (() if labels is None else (labels[index].to(dist.device),))

    return real
