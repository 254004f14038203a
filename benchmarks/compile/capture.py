"""Kernel launches recorded instead of run, and autotuned launches expanded into every config they can pick.

Inside ``recording()`` a launch ``kernel[grid](*args, **kwargs)`` of a ``triton.jit`` function appends a
``Launch`` (the function, its arguments as the JIT sees them, the launch options) and returns. A launch of a
``triton.autotune`` kernel becomes one launch per config its autotuner keeps after the kernel's own
``early_config_prune``: the autotuner could pick any of them on some GPU, so every one must compile and fit.
``triton.heuristics`` wrappers run as they do on a GPU, so their choices are what gets compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from benchmarks.compile.fake_cuda import Pointer

# The launch options of triton.Config / kernel[grid](..., num_warps=...) shown in a row's config.
OPTION_NAMES = ("num_warps", "num_stages", "num_ctas", "maxnreg")


@dataclasses.dataclass
class Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict
    tuned: dict  # the autotuner config's kwargs and options; {} for a launch with fixed parameters

    @property
    def kernel(self) -> str:
        return self.fn.__name__

    def config_text(self) -> str:
        """The tile parameters and launch options: the config's own for autotuned launches, else the launch's
        upper-case keyword constexprs (tiles a launcher's heuristic chose, and the flags that tell two launches
        of one kernel apart) and its options."""
        if self.tuned:
            items = dict(self.tuned)
        else:
            items = {k: v for k, v in self.kwargs.items() if k.isupper() or k in OPTION_NAMES}
        return " ".join(f"{k}={v}" for k, v in items.items())


def _innermost(kernel):
    while not isinstance(kernel, JITFunction) and hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


def _jit_view(value):
    return Pointer(value) if isinstance(value, torch.Tensor) else value


@contextlib.contextmanager
def recording(pick=None):
    """Yield a list that fills with the Launches made inside; nothing is compiled or run.

    ``pick(kernel name, configs) -> configs``: which of the configs an autotuner keeps are recorded (all by
    default).
    """
    launches: list[Launch] = []
    current_config: list[dict] = [{}]
    jit_run, tuned_run = JITFunction.run, Autotuner.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, tuple(_jit_view(a) for a in args),
                               {k: _jit_view(v) for k, v in kwargs.items()}, dict(current_config[0])))

    def expand(self, *args, grid, warmup, **kwargs):
        configs = list(self.configs)
        if self.early_config_prune:
            configs = self.early_config_prune(configs, dict(zip(self.arg_names, args)), **kwargs)
        if pick is not None:
            configs = pick(_innermost(self).__name__, configs)
        for config in configs:
            options = config.all_kwargs()
            options.pop("ir_override", None)
            if options.get("num_ctas") == 1:
                options.pop("num_ctas")
            current_config[0] = options
            try:
                self.fn.run(*args, grid=grid, warmup=warmup, **{**kwargs, **options})
            finally:
                current_config[0] = {}

    JITFunction.run, Autotuner.run = record, expand
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = jit_run, tuned_run


def describe_args(launch: Launch) -> dict[str, Any]:
    """Argument name -> value as the JIT binds them (for messages and tests)."""
    return dict(zip(launch.fn.arg_names, launch.args)) | launch.kwargs
