"""Loads the compiled extension ``genfast._C`` if it can, and remembers why not if it cannot.

The extension is optional: without it every op still works through its reference (and Triton,
where a GPU is present). ``GENFAST_SKIP_EXT=1`` skips loading it on purpose. The reason is logged
once, at the first op that would have used it, not at import time, so importing genfast stays quiet.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("genfast")

loaded: bool = False
why_not: str | None = None

if os.environ.get("GENFAST_SKIP_EXT") == "1":
    why_not = "skipped: GENFAST_SKIP_EXT=1"
else:
    try:
        from genfast import _C  # noqa: F401  (importing registers the TORCH_LIBRARY ops)

        loaded = True
    except ImportError as error:  # not built, or built against another torch
        why_not = f"genfast._C did not import ({error}); build it with `pip install -e . --no-build-isolation`"

_logged = False


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered a kernel for ``genfast::<op>`` under ``dispatch_key`` (CPU/CUDA)."""
    if not loaded:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"genfast::{op}", dispatch_key)


def _cuda_why_not() -> str | None:
    if not loaded:
        return why_not
    # Every CUDA build registers genfast::philox_noise for CUDA; its absence means a CPU-only build.
    if has_kernel("philox_noise", "CUDA"):
        return None
    if torch.version.cuda is None:
        return "this torch has no CUDA, so the extension was built for the CPU only"
    return "the extension was built without CUDA (no nvcc at build time, or GENFAST_SKIP_CUDA=1)"


# Plain module constants, computed once: backend selection reads them inside torch.compile'd code.
cuda_why_not: str | None = _cuda_why_not()
cuda_loaded: bool = cuda_why_not is None


def log_once_if_missing() -> None:
    global _logged
    if not loaded and not _logged:
        _logged = True
        log.warning("genfast: compiled extension unavailable, using the other backends: %s", why_not)
