"""Argument checks shared by the public ops. Every message names the argument and what was expected.

Cheap checks (types, shapes, dtypes, devices, Python scalars) always run. Checks of tensor *values*
(NaN, ranges of per-row tensors) need a host synchronisation on a GPU; the ops run them when
``validate=True`` (their default) and document what happens without them.

Also here, for the ops with a per-call cost in microseconds: ``call_op``, which skips the autograd layer.
"""

from __future__ import annotations

import numbers
import os
from typing import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def call_op(op, *args):
    """Call a custom op overload; outside torch.compile and autograd, straight to its kernel.

    For ops whose call is a few to tens of microseconds of work (a diffusion step on a small latent, one LSTM
    generation step): the Python autograd layer of a custom op costs about as much again, so it is skipped when no
    input requires grad. Under torch.compile and autograd the op is called normally, so tracing and gradients see
    the registered op.
    """
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def tensor(op: str, name: str, value, *, dtypes: Iterable[torch.dtype] | None = None, ndim: int | None = None,
           min_ndim: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in tuple(dtypes):
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype {names}, got {str(value.dtype).replace('torch.', '')}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def _device_memory_bytes(device: torch.device) -> int | None:
    """Total memory of ``device`` (host RAM for CPU tensors), or None where unknown."""
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


def fits_in_memory(op: str, name: str, value: int, nbytes: int, device: torch.device) -> None:
    """Refuse a size argument whose result (``nbytes``) is larger than the device's whole memory.

    Without this the caller gets the allocator's raw message ("you tried to allocate 8796093022208 bytes"), which
    does not say which argument asked for it. Skipped while torch.compile traces (sizes are fixed there).
    """
    if torch.compiler.is_compiling():
        return
    total = _device_memory_bytes(device)
    if total is not None and nbytes > total:
        raise ValueError(f"{op}: {name}={value} needs {nbytes / 2**30:.1f} GiB, more than the "
                         f"{total / 2**30:.1f} GiB of memory of {device}")


def same_device(op: str, reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, other in others.items():
        if other is not None and other.device != reference.device:
            raise ValueError(f"{op}: {name} is on {other.device} but {reference_name} is on {reference.device}")


def same_shape(op: str, reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, other in others.items():
        if other is not None and other.shape != reference.shape:
            raise ValueError(
                f"{op}: {name} has shape {tuple(other.shape)} but {reference_name} has shape {tuple(reference.shape)}"
            )


def real_number(op: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if value != value:
        raise ValueError(f"{op}: {name} must not be NaN")
    return value


def generator(op: str, gen, device: torch.device) -> None:
    if gen is None:
        return
    if not isinstance(gen, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None, got {type(gen).__name__}")
    if gen.device.type != device.type:
        raise ValueError(f"{op}: generator is on {gen.device} but the tensors are on {device}")


def draw_seed(gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One int64 Philox seed drawn from ``gen`` (or the default generator), left on ``device``.

    Drawing on the device keeps a GPU loop free of host synchronisation; the kernels read it there.
    """
    return torch.randint(0, 2**62, (1,), generator=gen, device=device, dtype=torch.int64)


def noise_or_seed(op: str, like: torch.Tensor, noise: torch.Tensor | None,
                  gen) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Validate caller-given ``noise`` (same shape and device as ``like``) or draw a seed from ``gen``."""
    if noise is not None:
        if gen is not None:
            raise ValueError(f"{op}: pass noise or generator, not both")
        tensor(op, "noise", noise, dtypes=FLOAT_DTYPES)
        same_device(op, "the input", like, noise=noise)
        same_shape(op, "the input", like, noise=noise)
        return noise.float().contiguous(), None
    generator(op, gen, like.device)
    return None, draw_seed(gen, like.device)
