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

import torch

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
from genfast.recipes._common import add_sample_args, backend_errors, load_or_exit, sample_device
from genfast.recipes._gan import GANTask, add_gan_args
from genfast.training import (
    CommandParser,
    add_train_args,
    batch_generator,
    mark_fixed,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    resolve_device,
    start_run,
    unit_interval,
)
from genfast.training.budget import check_training_memory

OPS = ("sample_tokens",)


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="genfast train numbergan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, recipe="numbergan", steps=3000, batch_size=64, lr=1e-3, ops=OPS, sample_every=50)
    add_gan_args(parser)
    parser.add_argument("--latent-dim", type=positive_int, default=32)
    parser.add_argument("--hidden", type=positive_int, default=256)
    parser.add_argument("--tau", type=positive_float, default=1.0, help="Gumbel-softmax temperature (default 1)")
    parser.add_argument("--eval-samples", type=positive_int, default=512, help="sequences per early-stopping check")
    parser.add_argument("--target", type=non_negative_float, default=0.02,
                        help="stop when the mean squared remainder mod 5 is at most this (default 0.02)")
    parser.add_argument("--patience", type=positive_int, default=20,
                        help="stop after this many checks without improvement")
    mark_fixed(parser, "--latent-dim", "--hidden")
    return parser


def train_main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        wanted = NumberGANConfig(latent_dim=args.latent_dim, hidden=args.hidden, tau=args.tau)
    except ValueError as exc:
        parser.error(str(exc))
    check_training_memory(parser, build=lambda: [Generator(wanted), Discriminator(wanted)],
                          forward_one=lambda m: m[1](m[0](torch.zeros(1, wanted.latent_dim)).softmax(-1)),
                          model_flags=f"--hidden {args.hidden} --latent-dim {args.latent_dim}",
                          batch_size=args.batch_size, device=resolve_device(parser, args.device))
    with start_run(parser, args, recipe="numbergan", ops=OPS) as run:
        try:
            if run.resuming:
                config = NumberGANConfig.from_dict(run.saved_config["model"])
            else:
                config = NumberGANConfig(latent_dim=args.latent_dim, hidden=args.hidden, tau=args.tau)
        except ValueError as exc:
            parser.error(str(exc))
        stopper = EarlyStopping(args.target, args.patience)
        G, D = Generator(config), Discriminator(config)
        device = run.device

        def real(step: int, batch: int) -> tuple[torch.Tensor, tuple]:
            integers = run.dist.shard(real_sequences(args.batch_size, config, batch_generator(args.seed, step)))
            return D.one_hot(integers.to(device)), ()

        def fake(gen, batch, extra):
            return straight_through_gumbel(gen(torch.randn(batch, config.latent_dim, device=device)), config.tau)

        def evaluate(step: int) -> bool:
            # The same seed on every rank (and weights DDP keeps equal): every rank decides alike.
            G.eval()
            samples = G.sample(args.eval_samples, generator=torch.Generator(device).manual_seed(args.seed))
            G.train()
            msr, frac = mean_squared_remainder(samples, config.modulus), multiple_fraction(samples, config.modulus)
            run.log(f"step {step}: mean squared remainder {msr:.4f}, multiples of {config.modulus} {frac:.1%}, "
                    f"e.g. {samples[0].tolist()}")
            return stopper.update(msr)

        task = GANTask(run, G, D, config.to_dict(), real=real, fake=fake, evaluate=evaluate,
                       state=stopper.state_dict, load_state=stopper.load_state_dict)
        return run.train(task)


def sample_main(argv: list[str]) -> int:
    parser = CommandParser(prog="genfast sample numbergan", description="Print generated sequences.")
    add_sample_args(parser, ops=OPS)
    parser.add_argument("--n", type=positive_int, default=8, help="number of sequences (default 8)")
    parser.add_argument("--temperature", type=non_negative_float, default=1.0,
                        help="0: the most likely integer at each place")
    parser.add_argument("--top-k", type=non_negative_int, default=0)
    parser.add_argument("--top-p", type=unit_interval, default=1.0)
    args = parser.parse_args(argv)
    device = sample_device(parser, args, OPS)
    G = load_or_exit(parser, lambda: Generator.from_checkpoint(args.ckpt, device,
                                                                allow_nonfinite=args.allow_nonfinite))
    samples = backend_errors(parser, lambda: G.sample(
        args.n, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        generator=torch.Generator(device).manual_seed(args.seed)))
    for row in samples.tolist():
        print(" ".join(f"{v:2d}" for v in row))
    msr = mean_squared_remainder(samples, G.config.modulus)
    print(f"mean squared remainder mod {G.config.modulus}: {msr:.4f}, "
          f"multiples: {multiple_fraction(samples, G.config.modulus):.1%}", file=sys.stderr)
    return 0
