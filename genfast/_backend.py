"""Backend registry and selection.

Every public op owns a :class:`Dispatcher`: the reference (pure PyTorch, always present) plus the
kernels that could serve it (``cuda``, ``triton``, ``cpu``). Selection happens in Python at call
time, before any custom op is reached, and reads only plain module state, so TorchDynamo traces
through it and ``torch.compile(fullgraph=True)`` sees exactly one custom op per call.

Choosing:
- ``auto`` (default): the first backend in the op's preference order for the tensor's device that
  supports the call; the reference last, so ``auto`` never fails where the reference works.
- a backend by name (``set_backend``, ``with backend(...)``, ``GENFAST_BACKEND``): used if it can
  serve the call, else :class:`BackendError` says why. It never falls back silently.

Thread safety: ``set_backend`` and ``GENFAST_BACKEND`` choose for the whole process; ``with backend(...)``
chooses for its own thread only, and restores the previous choice on exit.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from genfast import _ext

BACKENDS = ("reference", "triton", "cuda", "cpu")
CHOICES = ("auto",) + BACKENDS

# Where auto looks first, per device type. Ops may reorder (a Triton kernel that beats the CUDA one).
DEFAULT_PREFERENCE = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}


class BackendError(RuntimeError):
    """A backend chosen by name cannot serve this call."""


def _checked(name: str, source: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(CHOICES)}")
    return name


class _ThreadChoices(threading.local):
    """The ``with backend(...)`` blocks open in the current thread, innermost last."""

    def __init__(self) -> None:
        # Set per thread in __init__ (not as a class attribute): TorchDynamo then guards on this thread's value, so
        # a compiled function retraces when the choice differs, in whichever thread calls it. (It cannot trace
        # ContextVar.get, and a class-level default would go unguarded.)
        self.blocks: tuple[str, ...] = ()


# The process-wide choice (set_backend, GENFAST_BACKEND) sits in a one-item list; ``with backend(...)`` blocks are
# per thread, so a block changes the backend of its own thread only: another thread never sees it.
_process_choice: list[str] = [_checked(os.environ.get("GENFAST_BACKEND", "auto"), "GENFAST_BACKEND")]
_thread = _ThreadChoices()


def set_backend(name: str) -> None:
    """Choose the backend for every genfast op from now on, in every thread: 'auto', 'reference', 'triton', 'cuda'
    or 'cpu'. A ``with backend(...)`` block still overrides it inside that block's own thread."""
    _process_choice[0] = _checked(name, "set_backend(name)")


def get_backend() -> str:
    """The backend in force here: the innermost ``with backend(...)`` of this thread, else the ``set_backend``
    choice."""
    blocks = _thread.blocks
    return blocks[-1] if blocks else _process_choice[0]


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """``with genfast.backend("triton"): ...`` runs the block with that backend, in this thread only."""
    outer = _thread.blocks
    _thread.blocks = outer + (_checked(name, "backend(name)"),)
    try:
        yield
    finally:
        _thread.blocks = outer


def _triton_missing() -> str | None:
    """Why triton cannot be imported, as far as finding it tells (it is not imported here)."""
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError) as error:  # a broken entry in sys.modules
        return f"triton is not installed ({error})"
    return None if found else "triton is not installed (no module named 'triton')"


# [why triton cannot serve, or None; whether that answer is final]. `import genfast` only looks for the package:
# importing triton costs more than half of what `import genfast` adds to torch's own import, and a process that
# runs the C++ kernels or the reference never needs it. The first question about the triton backend imports it
# (so an installed but broken triton is refused with its error, as before, never met inside a kernel call).
_triton: list = [_triton_missing(), False]


def triton_why_not() -> str | None:
    """None when the triton package imports here, else the reason. Imports triton on the first call."""
    if not _triton[1]:  # plain module state once settled: TorchDynamo traces through this (and the import) too
        if _triton[0] is None:
            try:
                import triton  # noqa: F401
            except ImportError as error:
                _triton[0] = f"triton is not installed ({error})"
        _triton[1] = True
    return _triton[0]


# Read once at import: Triton itself decides between compiling and interpreting when kernels are
# defined (at import), so a later change of TRITON_INTERPRET would not take effect anyway.
TRITON_INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"


# A predicate gets the call's device, dtype and any op-specific facts, and returns None when it can
# serve the call or a short reason when it cannot.
Supports = Callable[..., "str | None"]


@dataclass
class Implementation:
    backend: str
    fn: Callable
    supports: Supports | None = None


@dataclass
class Dispatcher:
    """The backends of one public op. ``op`` is its public name, used in messages and `genfast info`."""

    op: str
    reference: Callable
    preference: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_PREFERENCE))
    impls: dict[str, Implementation] = field(default_factory=dict)

    def register(self, backend_name: str, supports: Supports | None = None) -> Callable[[Callable], Callable]:
        if backend_name not in BACKENDS or backend_name == "reference":
            raise ValueError(f"register: backend must be one of triton, cuda, cpu, not {backend_name!r}")

        def decorate(fn: Callable) -> Callable:
            self.impls[backend_name] = Implementation(backend_name, fn, supports)
            return fn

        return decorate

    def why_not(self, backend_name: str, device: torch.device, dtype: torch.dtype | None = None, **facts) -> str | None:
        """None if ``backend_name`` can serve a call on this device/dtype, else the reason."""
        if backend_name == "reference":
            return None
        impl = self.impls.get(backend_name)
        if impl is None:
            return f"genfast has no {backend_name} kernel for {self.op}"
        if backend_name == "triton":
            missing = triton_why_not()
            if missing:
                return missing
            if device.type == "cpu" and not TRITON_INTERPRET:
                return ("Triton runs CPU tensors only in its interpreter "
                        "(set TRITON_INTERPRET=1 before importing genfast)")
            if device.type not in ("cpu", "cuda"):
                return f"Triton does not run on {device.type} tensors"
        elif backend_name in ("cpu", "cuda"):
            if backend_name != device.type:
                return f"the {backend_name} backend serves {backend_name} tensors, not {device.type} tensors"
            if not _ext.loaded:
                return f"the compiled extension is not loaded: {_ext.why_not}"
            if backend_name == "cuda" and not _ext.cuda_loaded:
                return f"the extension has no CUDA kernels: {_ext.cuda_why_not}"
        if impl.supports is not None:
            return impl.supports(device=device, dtype=dtype, **facts)
        return None

    def select(self, device: torch.device, dtype: torch.dtype | None = None, **facts) -> tuple[str, Callable]:
        """The (backend name, function) that serves this call under the backend in force."""
        chosen = get_backend()
        if chosen == "reference":
            return "reference", self.reference
        if chosen != "auto":
            reason = self.why_not(chosen, device, dtype, **facts)
            if reason is not None:
                raise BackendError(f"{self.op}: backend {chosen!r} cannot serve this call: {reason}")
            return chosen, self.impls[chosen].fn
        for name in self.preference.get(device.type, ()):
            if self.why_not(name, device, dtype, **facts) is None:
                return name, self.impls[name].fn
        if device.type in ("cpu", "cuda") and "cpu" in self.impls:
            _ext.log_once_if_missing()
        return "reference", self.reference

    def __call__(self, *args, device: torch.device, dtype: torch.dtype | None = None, facts=None, **kwargs):
        _, fn = self.select(device, dtype, **(facts or {}))
        return fn(*args, **kwargs)


DISPATCHERS: dict[str, Dispatcher] = {}


def dispatcher(op: str, reference: Callable, preference: dict[str, tuple[str, ...]] | None = None) -> Dispatcher:
    """Create and record the dispatcher of public op ``op`` (listed by `genfast info`)."""
    d = Dispatcher(op, reference, dict(preference or DEFAULT_PREFERENCE))
    DISPATCHERS[op] = d
    return d
