"""Seeds and random-number-generator state, so that a resumed run continues exactly where it stopped.

Two rules make resume exact: the batch of step ``s`` comes from ``batch_generator(seed, s)`` (a pure function
of the step, not of how many batches were drawn before), and the global RNG state (dropout, noise) is saved
in the checkpoint (``capture_rng_state``) and put back on resume (``restore_rng_state``).
"""

from __future__ import annotations

import random

import torch


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (CPU and every CUDA device)."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    torch.manual_seed(seed)


def batch_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator for the data of one step (and rank): the same batch for the same step, always."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + rank)


def capture_rng_state() -> dict:
    """The global RNG states as tensors and lists (torch.load(weights_only=True) reads them back)."""
    py_version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [py_version, list(py_state), py_gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
