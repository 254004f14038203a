"""Refusing a training run whose flags ask for more memory than the machine has, before anything is allocated.

A flag like ``--latent-dim 10**9`` or ``--batch-size 10**12`` used to end in an allocator traceback (or the kernel's
OOM killer) after the data had loaded. :func:`check_training_memory` estimates, from the flags alone:

- the model's weights, from a build on the meta device (no memory), times four for training in fp32 (the weights,
  their gradients and Adam's two moments);
- the activations of one batch: ``batch_size`` times what one sample's forward pass produces (every leaf module's
  outputs, which autograd keeps for the backward pass), measured by running the model on one sample once its
  weights are known to fit, times two for their gradients;

and ends in a one-line usage error naming the flag when the sum exceeds the training device's memory. The estimate
is a lower bound (optimizer temporaries, the allocator's slack and the data are not counted): it refuses only what
cannot run.
"""

from __future__ import annotations

import argparse
from typing import Callable, Iterable

import torch
from torch import nn

from genfast._io import machine_memory_bytes

TRAINING_COPIES = 4  # weights, gradients, and Adam's exp_avg and exp_avg_sq
ACTIVATION_COPIES = 2  # each saved activation and its gradient


def device_memory_bytes(device: torch.device) -> int:
    """The memory a run on ``device`` can use: the GPU's, or this machine's for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return machine_memory_bytes()


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.1f} GiB"


def _tensor_bytes(modules: Iterable[nn.Module]) -> tuple[int, int]:
    """(parameter count, bytes of parameters and buffers)."""
    count = nbytes = 0
    for module in modules:
        for p in module.parameters():
            count += p.numel()
            nbytes += p.numel() * p.element_size()
        nbytes += sum(b.numel() * b.element_size() for b in module.buffers())
    return count, nbytes


def _activation_bytes(modules: Iterable[nn.Module], forward_one: Callable[[list[nn.Module]], object]) -> int:
    """Bytes of every leaf module's outputs during ``forward_one`` (one sample through the model)."""
    modules = list(modules)
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        for out in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(out, torch.Tensor):
                total += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for module in modules for m in module.modules()
               if not any(True for _ in m.children())]
    try:
        with torch.no_grad():
            forward_one(modules)
    finally:
        for handle in handles:
            handle.remove()
    return total


def check_training_memory(parser: argparse.ArgumentParser, *, build: Callable[[], list[nn.Module]],
                          forward_one: Callable[[list[nn.Module]], object], model_flags: str, batch_size: int,
                          device: torch.device) -> None:
    """A usage error (naming ``model_flags``, e.g. ``"--latent-dim 1000000000 --base-channels 32"``, or
    --batch-size) when training the modules ``build()`` makes, on batches of ``batch_size``, cannot fit the memory of
    ``device``. ``forward_one(modules)`` runs one sample through them (on the CPU)."""
    memory = device_memory_bytes(device)
    try:
        with torch.device("meta"):
            shells = build()
        count, weights = _tensor_bytes(shells)
    except (RuntimeError, ValueError, OverflowError) as exc:  # a storage size that overflows int64
        parser.error(f"{model_flags}: the model is too large to build ({str(exc).splitlines()[0]})")
    training = TRAINING_COPIES * weights
    if training > memory:
        parser.error(f"{model_flags}: a model of {count:,} parameters needs {_gib(training)} to train (weights, "
                     f"gradients, Adam's state), more than the {_gib(memory)} of {device.type}")
    per_sample = ACTIVATION_COPIES * _activation_bytes(build(), forward_one)
    if training + batch_size * per_sample > memory:
        parser.error(f"--batch-size {batch_size}: {batch_size:,} samples of about {per_sample:,} bytes of "
                     f"activations each, with the model's {_gib(training)}, need "
                     f"{_gib(training + batch_size * per_sample)}, more than the {_gib(memory)} of {device.type}")


__all__ = ["check_training_memory", "device_memory_bytes"]
