"""The flags every `genfast train <model>` shares, and the argparse types recipes use for their own.

Every bad value is a usage error (exit status 2, one line, no traceback): the types below raise
argparse.ArgumentTypeError, and genfast.training.loop.start_run checks what needs more than one flag or the
machine (the device, the backend, the --out folder, the checkpoint to resume).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from genfast._backend import BACKENDS, DISPATCHERS

FIXED_HELP = " [fixed by the run: --resume refuses another value]"


class CommandParser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``<prog>: error: <message> (<prog> --help lists the options)``,
    exit status 2. After parsing, ``explicit`` holds the dests the command line set (not left at their default):
    --resume applies a run's saved flags to the others, and refuses or announces the ones given."""

    explicit: set[str] | None = None

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")

    def parse_known_args(self, args=None, namespace=None):
        result = super().parse_known_args(args, namespace)
        # Parse again with every default suppressed: what is left in the namespace is what the user typed.
        defaults = [(action, action.default) for action in self._actions]
        try:
            for action, _ in defaults:
                action.default = argparse.SUPPRESS
            probe, _ = super().parse_known_args(args, argparse.Namespace())
        finally:
            for action, default in defaults:
                action.default = default
        self.explicit = set(vars(probe))
        return result


def mark_fixed(parser: argparse.ArgumentParser, *flags: str) -> None:
    """Mark architecture and data flags (``"--config"`` ...) as fixed by the run: on --resume a value other than
    the run's is a usage error (the checkpoint's model is what trains), and --help says so. The other recorded
    flags (--lr, --steps ...) may change on resume: they are applied and announced."""
    by_flag = {flag: action for action in parser._actions for flag in action.option_strings}
    for flag in flags:
        action = by_flag[flag]
        action.fixed_on_resume = True
        action.help = (action.help or "") + FIXED_HELP


def _number(kind, test, wanted: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if isinstance(value, float) and not math.isfinite(value) or not test(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid <name> value"
    return parse


positive_int = _number(int, lambda v: v > 0, "> 0")
non_negative_int = _number(int, lambda v: v >= 0, ">= 0")
positive_float = _number(float, lambda v: v > 0, "> 0")
non_negative_float = _number(float, lambda v: v >= 0, ">= 0")
probability = _number(float, lambda v: 0 <= v <= 1, "in [0, 1]")
open_probability = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")  # dropout: 1 would drop everything
unit_interval = _number(float, lambda v: 0 < v <= 1, "in (0, 1]")  # top-p


def backend_choices(ops: tuple[str, ...]) -> tuple[str, ...]:
    """The --backend values that can serve every op in ``ops`` (public op names, as `genfast info` lists them):
    auto and reference always, and each kernel backend that implements all of them."""
    kernels = [name for name in BACKENDS if name != "reference"
               and all(op in DISPATCHERS and name in DISPATCHERS[op].impls for op in ops)]
    return ("auto", "reference", *kernels)


def add_device_args(parser: argparse.ArgumentParser, *, ops: tuple[str, ...]) -> None:
    """--device, --backend (the choices this model's ops can be served by; see backend_choices) and
    --allow-nonfinite: the options of every `genfast train` and `genfast sample` that load weights."""
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    choices = backend_choices(ops)
    parser.add_argument("--backend", default=None, choices=choices,
                        help=f"genfast kernel backend: {', '.join(choices)} (default: auto)")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="load weights holding NaN or inf (refused otherwise): to debug a run that diverged")


def add_train_args(parser: argparse.ArgumentParser, *, recipe: str, steps: int, batch_size: int, lr: float,
                   ops: tuple[str, ...], save_every: int = 500, sample_every: int = 500) -> None:
    """--out --steps --resume --overwrite --seed --device --backend --batch-size --lr --save-every --sample-every
    --quiet --stop-after: the flags of every `genfast train <model>`."""
    out = f"runs/{recipe}"
    parser.add_argument("--out", type=Path, default=Path(out),
                        help=f"run folder: checkpoint/ and samples/ go there (default {out})")
    parser.add_argument("--steps", type=positive_int, default=steps, help=f"optimizer steps in all (default {steps})")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh even though --out holds a checkpoint (replaced at the first save)")
    seed = parser.add_argument("--seed", type=non_negative_int, default=0,
                               help="seed of the data order and init" + FIXED_HELP)
    seed.fixed_on_resume = True
    add_device_args(parser, ops=ops)
    parser.add_argument("--batch-size", type=positive_int, default=batch_size,
                        help=f"global batch size, split over the processes (default {batch_size})")
    parser.add_argument("--lr", type=positive_float, default=lr, help=f"learning rate (default {lr})")
    parser.add_argument("--save-every", type=positive_int, default=save_every,
                        help=f"steps between checkpoints (default {save_every}; also at the end and on Ctrl-C)")
    parser.add_argument("--sample-every", type=positive_int, default=sample_every,
                        help=f"steps between samples / evals (default {sample_every}; also at the end)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or sample printouts")
    parser.add_argument("--stop-after", type=positive_int, default=None,
                        help="save and stop after this many steps of this run (time-limited jobs; --resume later)")


def resolve_device(parser: argparse.ArgumentParser, text: str | None) -> torch.device:
    """The torch.device of --device (default: cuda when available), or a usage error saying why it cannot be used:
    a malformed name, CUDA asked of a torch built without it or a machine without a GPU, an index past the last
    GPU."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"--device: {text!r} is not a device name (cpu, cuda, cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            parser.error(f"--device {text}: {why}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {text}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        parser.error(f"--device {text}: genfast runs on cpu or cuda, not {device.type}")
    return device


def check_backend(parser: argparse.ArgumentParser, name: str | None, device: torch.device,
                  ops: tuple[str, ...]) -> None:
    """A usage error when --backend ``name`` cannot serve ``ops`` on ``device`` (Triton on CPU tensors without its
    interpreter, CUDA kernels for CPU tensors, a missing compiled extension ...)."""
    if name in (None, "auto", "reference"):
        return
    for op in ops:
        dispatcher = DISPATCHERS.get(op)
        if dispatcher is None:
            continue
        try:
            reason = dispatcher.why_not(name, device)
        except (TypeError, KeyError):  # a support check that needs the call's shapes: decided at the call
            reason = None
        if reason is not None:
            parser.error(f"--backend {name} cannot run {op} on {device.type}: {reason}")


__all__ = ["CommandParser", "mark_fixed", "resolve_device", "check_backend", "add_train_args", "add_device_args",
           "backend_choices",
           "positive_int", "non_negative_int", "positive_float", "non_negative_float", "probability",
           "open_probability", "unit_interval"]
