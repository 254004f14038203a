"""genfast: fused attention, transposed-convolution and sampling kernels for generative models.

    import genfast
    tokens = genfast.ops.sample_tokens(logits, temperature=0.8, top_k=50, top_p=0.9)
    with genfast.backend("reference"):      # or set_backend(...), or GENFAST_BACKEND=...
        ...

`genfast.info()` (or `genfast info` in a shell) tells which backends serve each op here.

``import genfast`` loads the kernel library (ops, nn, diffusion schedulers, the backends); the applications built on
it (genfast.models, genfast.recipes, genfast.training, genfast.data) load on first use, e.g. ``genfast.models.GPT``.
"""

# _ext before the rest: loading genfast._C registers the C++ op schemas that the ops modules refer to.
from genfast import _ext  # noqa: F401, I001
from genfast import diffusion, nn, ops
from genfast._backend import BACKENDS, BackendError, backend, get_backend, set_backend
from genfast._info import info
from genfast.nn.fuse import fuse

__version__ = "0.1.0"

_LAZY = ("models", "recipes", "training", "data", "integrations")


def __getattr__(name: str):
    """genfast.models (and recipes, training, data, integrations) on first use: importing them costs time the
    kernels do not need."""
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"genfast.{name}")
    raise AttributeError(f"module 'genfast' has no attribute {name!r}")


__all__ = ["ops", "nn", "fuse", "diffusion", "models", "integrations", "BACKENDS", "BackendError", "backend",
           "get_backend", "set_backend", "info", "__version__"]
