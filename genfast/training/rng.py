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


def check_rng_state(state: object) -> None:
    """ValueError naming the field unless ``state`` is what capture_rng_state writes: without it a resume is no
    longer exact (an empty dict restored nothing), and a garbage state ends in a torch traceback."""
    if not isinstance(state, dict):
        raise ValueError(f"rng must be a dict, got {type(state).__name__}")
    unknown = sorted(str(k) for k in state if k not in ("torch", "python", "cuda"))
    if unknown:
        raise ValueError(f"rng: unknown field {unknown[0]!r}")
    for key in ("torch", "python"):
        if key not in state:
            raise ValueError(f"rng lacks {key!r}: resuming without it would not be exact")
    cpu = state["torch"]
    reference = torch.get_rng_state()
    if not isinstance(cpu, torch.Tensor) or cpu.dtype != torch.uint8 or cpu.shape != reference.shape:
        what = f"{cpu.dtype} {list(cpu.shape)}" if isinstance(cpu, torch.Tensor) else type(cpu).__name__
        raise ValueError(f"rng.torch must be a uint8 tensor of shape {list(reference.shape)}, got {what}")
    py = state["python"]
    try:
        version, internal, gauss = py
        if gauss is not None and type(gauss) is not float:
            raise TypeError(f"its gauss entry must be None or a float, got {type(gauss).__name__}")
        random.Random().setstate((version, tuple(internal), gauss))  # a throwaway generator: validates only
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"rng.python is not a Python random state: {exc}") from None
    cuda = state.get("cuda", [])
    if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.dim() == 1
                                             for t in cuda):
        raise ValueError("rng.cuda must be a list of uint8 tensors")


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
