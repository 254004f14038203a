"""`genfast train numbergan` and `genfast sample numbergan`: a GAN over integer sequences that learns to write
multiples of 5 (genfast/models/numbergan.py).

    genfast train numbergan --out runs/numbergan          # stops early once samples are (almost) all multiples
    genfast sample numbergan --ckpt runs/numbergan --n 8

Every --sample-every steps the generator writes --eval-samples sequences (genfast.ops.sample_tokens, a fixed
seed); training stops early when their mean squared remainder mod 5 reaches --target, or has not improved for
--patience checks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import genfast
from genfast.models.numbergan import (
    Discriminator,
    EarlyStopping,
    Generator,
    NumberGANConfig,
    mean_squared_remainder,
    multiple_fraction,
    real_sequences,
    straight_through_gumbel,
)
from genfast.recipes._common import add_common_train_args, check_positive, start_run
from genfast.recipes._gan import GANTask, add_gan_args, checkpoint_config, train_gan
from genfast.training import batch_generator, load_checkpoint


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genfast train numbergan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_train_args(parser, steps=3000, batch_size=64, lr=1e-3, out="runs/numbergan")
    add_gan_args(parser)
    parser.set_defaults(sample_every=50)
    parser.add_argument("--latent-dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--tau", type=float, default=1.0, help="Gumbel-softmax temperature (default 1)")
    parser.add_argument("--eval-samples", type=int, default=512, help="sequences per early-stopping check")
    parser.add_argument("--target", type=float, default=0.02,
                        help="stop when the mean squared remainder mod 5 is at most this (default 0.02)")
    parser.add_argument("--patience", type=int, default=20, help="stop after this many checks without improvement")
    return parser


def train_main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    check_positive(parser, args, "steps", "batch_size", "lr", "save_every", "sample_every", "eval_samples",
                   "patience", "tau")
    try:
        if args.resume:
            config = NumberGANConfig(**checkpoint_config(args.out, "numbergan")["model"])
        else:
            config = NumberGANConfig(latent_dim=args.latent_dim, hidden=args.hidden, tau=args.tau)
        stopper = EarlyStopping(args.target, args.patience)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        parser.error(str(exc))
    dist = start_run(args)
    if args.batch_size % dist.world_size:
        parser.error(f"--batch-size {args.batch_size} must be divisible by the {dist.world_size} processes")
    try:
        G, D = Generator(config), Discriminator(config)

        def real(step: int, batch: int) -> tuple[torch.Tensor, tuple]:
            integers = dist.shard(real_sequences(args.batch_size, config, batch_generator(args.seed, step)))
            return D.one_hot(integers.to(dist.device)), ()

        def fake(gen, batch, extra):
            return straight_through_gumbel(gen(torch.randn(batch, config.latent_dim, device=dist.device)), config.tau)

        def evaluate(step: int, final: bool) -> bool:
            # The same seed on every rank (and weights DDP keeps equal): every rank decides alike.
            G.eval()
            samples = G.sample(args.eval_samples, generator=torch.Generator(dist.device).manual_seed(args.seed))
            G.train()
            msr, frac = mean_squared_remainder(samples, config.modulus), multiple_fraction(samples, config.modulus)
            stop = stopper.update(msr) if not final else False
            if dist.is_main and not args.quiet:
                print(f"step {step}: mean squared remainder {msr:.4f}, multiples of {config.modulus} {frac:.1%}, "
                      f"e.g. {samples[0].tolist()}", file=sys.stderr)
            return stop

        task = GANTask("numbergan", G, D, config.to_dict(), real, fake, evaluate, state=stopper.state_dict,
                       load_state=lambda s: stopper.load_state_dict(s) if s else None)
        return train_gan(args, dist, task)
    finally:
        dist.close()


def sample_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="genfast sample numbergan", description="Print generated sequences.")
    parser.add_argument("--ckpt", type=Path, required=True, help="the checkpoint folder (train's --out)")
    parser.add_argument("--n", type=int, default=8, help="number of sequences (default 8)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: the most likely integer at each place")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default=None, choices=genfast.BACKENDS)
    args = parser.parse_args(argv)
    check_positive(parser, args, "n")
    if args.backend:
        genfast.set_backend(args.backend)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        G = Generator(NumberGANConfig(**checkpoint_config(args.ckpt, "numbergan")["model"]))
        load_checkpoint(args.ckpt, modules={"generator": G})
    except (FileNotFoundError, ValueError, TypeError) as exc:
        parser.error(f"--ckpt: {exc}")
    G = G.to(device).eval()
    try:
        samples = G.sample(args.n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           generator=torch.Generator(device).manual_seed(args.seed))
    except (ValueError, genfast.BackendError) as exc:
        parser.error(str(exc))
    for row in samples.tolist():
        print(" ".join(f"{v:2d}" for v in row))
    msr = mean_squared_remainder(samples, G.config.modulus)
    print(f"mean squared remainder mod {G.config.modulus}: {msr:.4f}, "
          f"multiples: {multiple_fraction(samples, G.config.modulus):.1%}", file=sys.stderr)
    return 0
