"""Pieces every training recipe shares: the common command-line options and the run set-up."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import genfast
from genfast.training import Distributed, find_checkpoint, load_checkpoint, seed_everything


def add_common_train_args(parser: argparse.ArgumentParser, *, steps: int, batch_size: int, lr: float,
                          out: str) -> None:
    """--steps --batch-size --lr --out --resume --seed --device --backend --save-every --sample-every --quiet."""
    parser.add_argument("--steps", type=int, default=steps, help=f"optimizer steps in all (default {steps})")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"global batch size, split over the processes (default {batch_size})")
    parser.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    parser.add_argument("--out", type=Path, default=Path(out), help=f"checkpoint and sample folder (default {out})")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--backend", default=None, choices=genfast.BACKENDS,
                        help="genfast kernel backend (default: auto)")
    parser.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    parser.add_argument("--sample-every", type=int, default=500, help="steps between sample grids / evals")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def check_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """parser.error naming the first option among ``names`` (attribute names) that is not > 0."""
    for name in names:
        value = getattr(args, name)
        if value is None or value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")


def start_run(args: argparse.Namespace) -> Distributed:
    """Seed, pick the backend, join torchrun's process group if any; returns the Distributed context.

    Each rank seeds differently for its noise (seed + rank) while data batches come from
    genfast.training.batch_generator(seed, step, rank), so a resumed run replays exactly.
    """
    dist = Distributed.from_environment(args.device)
    seed_everything(args.seed + dist.rank)
    if args.backend:
        genfast.set_backend(args.backend)
    return dist


def autocast(device: torch.device | str):
    """bf16 autocast on CUDA (what the recipes train in on a GPU); nothing on CPU."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def checkpoint_config(ckpt: str | Path, model: str, label: str) -> tuple[Path, dict]:
    """(checkpoint directory, saved config) for ``--ckpt``, which may be a training --out folder or its
    checkpoint/ folder; the config must say it is a ``model`` checkpoint (``label`` names it in errors)."""
    ckpt = Path(ckpt)
    directory = ckpt / "checkpoint" if find_checkpoint(ckpt / "checkpoint") is not None else ckpt
    if find_checkpoint(directory) is None:
        raise FileNotFoundError(f"no {label} checkpoint at {ckpt}")
    _, config = load_checkpoint(directory)  # config only: the weights need the model built first
    if config.get("model") != model:
        raise ValueError(f"{ckpt} holds a {config.get('model')!r} checkpoint, not a {label}")
    return directory, config


def checkpoint_and_sample(step: int, args: argparse.Namespace, dist: Distributed, *, stopping: bool, save,
                          sample_grid, samples_dir: Path) -> bool:
    """The end of a training step: save on --save-every, at the last step and when stopping; on the main process
    write a sample grid on --sample-every and at the last step. Returns ``stopping`` (break the loop when True)."""
    if step % args.save_every == 0 or step == args.steps or stopping:
        save()
    if dist.is_main and (step % args.sample_every == 0 or step == args.steps):
        sample_grid(samples_dir / f"step_{step:06d}.png")
    return stopping
