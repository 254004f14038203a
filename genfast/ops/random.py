"""genfast's random numbers: the Philox stream every stochastic kernel draws its noise from.

``philox_noise(seed, numel)`` returns elements ``offset .. offset+numel-1`` of the stream; a
stochastic op run with ``seed`` draws element ``i`` of its (contiguous) noise as element ``i`` here.
That is what lets the tests hand the reference exactly the noise a fused kernel drew inside itself.
"""

from __future__ import annotations

import torch

from genfast import _backend, _ext, _philox
from genfast.ops import _checks

OP = "philox_noise"
STREAM_END = 2**63 - 1  # element indices are int64: offset + numel may not pass this


def philox_noise_ref(seed: torch.Tensor, numel: int, offset: int = 0, normal: bool = False) -> torch.Tensor:
    """The specification (NumPy, genfast/_philox.py), returned on ``seed``'s device."""
    indices = torch.arange(offset, offset + numel, dtype=torch.int64).numpy().astype("uint64")
    draw = _philox.normal if normal else _philox.uniform
    return torch.from_numpy(draw(int(seed.item()), indices)).to(seed.device)


def _fake(seed, numel, offset, normal):
    return seed.new_empty(numel, dtype=torch.float32)


if _ext.loaded:
    torch.library.register_fake(f"genfast::{OP}")(_fake)


@torch.library.custom_op(f"genfast::{OP}_triton", mutates_args=())
def _philox_noise_triton(seed: torch.Tensor, numel: int, offset: int, normal: bool) -> torch.Tensor:
    from genfast.kernels.random import philox_noise

    return philox_noise(seed, numel, offset, normal)


_philox_noise_triton.register_fake(_fake)

_dispatch = _backend.dispatcher(OP, philox_noise_ref)
_dispatch.register("triton")(lambda *args: torch.ops.genfast.philox_noise_triton(*args))
_dispatch.register("cpu")(lambda *args: torch.ops.genfast.philox_noise(*args))
_dispatch.register("cuda")(lambda *args: torch.ops.genfast.philox_noise(*args))


def philox_noise(seed: int | torch.Tensor, numel: int, *, offset: int = 0, normal: bool = False,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Elements ``offset .. offset+numel-1`` of genfast's Philox stream seeded with ``seed``.

    Returns float32 [numel]: uniform in the open interval (0, 1), or standard normal if ``normal``.
    ``offset + numel`` may not pass 2**63 - 1 (the stream is indexed by int64); every backend refuses it.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, torch.Tensor)):
        raise TypeError(f"{OP}: seed must be an int or a one-element int64 tensor, got {type(seed).__name__}")
    if isinstance(seed, int):
        if not 0 <= seed < 2**63:
            raise ValueError(f"{OP}: seed must be in [0, 2**63), got {seed}")
        seed = torch.tensor([seed], dtype=torch.int64, device=device)
    elif seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(f"{OP}: seed must hold one int64 value, got shape {tuple(seed.shape)} and {seed.dtype}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"{OP}: numel must be a non-negative int, got {numel!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"{OP}: offset must be a non-negative int, got {offset!r}")
    if offset + numel > STREAM_END:
        # The stream's element indices are int64 on every backend: past the end they would wrap to element 0.
        raise ValueError(f"{OP}: offset + numel must be <= 2**63 - 1 (the end of the stream), got offset={offset} "
                         f"and numel={numel}")
    seed = seed.reshape(1)
    _checks.fits_in_memory(OP, "numel", numel, 4 * numel, seed.device)
    return _dispatch(seed, numel, offset, bool(normal), device=seed.device)


__all__ = ["philox_noise", "philox_noise_ref"]
