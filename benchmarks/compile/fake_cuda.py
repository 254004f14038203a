"""Tensors that say they live on a CUDA device, on a machine without one.

Inside ``cuda_on_meta()`` every tensor is a meta tensor (shapes, strides and dtypes, no storage) that answers
``device`` with ``cuda:0`` and ``is_cuda`` with True, and factory calls given a CUDA device make meta tensors.
A launcher called there takes the branch it takes on a GPU and computes every argument of its kernel launch,
and nothing is allocated or run. (FakeTensorMode cannot do this on a CPU-only torch: its views of a CUDA
tensor need the CUDA runtime.)
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch.overrides import TorchFunctionMode

CUDA = torch.device("cuda", 0)
META = torch.device("meta")


def _to_meta(value):
    if isinstance(value, (torch.device, str)):
        try:
            if torch.device(value).type == "cuda":
                return META
        except RuntimeError:  # a string that is not a device
            pass
    return value


class _CudaOnMeta(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func == torch.Tensor.device.__get__:
            return CUDA
        if func == torch.Tensor.is_cuda.__get__:
            return True
        if func is torch.device:  # naming a device is not making a tensor on it
            return func(*args, **(kwargs or {}))
        args = tuple(_to_meta(a) for a in args)
        kwargs = {k: _to_meta(v) for k, v in (kwargs or {}).items()}
        return func(*args, **kwargs)


# What torch.cuda reports inside cuda_on_meta(arch), per gated architecture: an H100/H200 and an A100.
DEVICES = {
    "90a": {"name": "NVIDIA H200 (compile gate)", "major": 9, "minor": 0, "multi_processor_count": 132,
            "shared_memory_per_block_optin": 232448},
    "80": {"name": "NVIDIA A100 (compile gate)", "major": 8, "minor": 0, "multi_processor_count": 108,
           "shared_memory_per_block_optin": 166912},
}


@contextlib.contextmanager
def cuda_on_meta(arch: str = "90a"):
    """Run a launcher as if on a GPU of ``arch``: tensors made inside are meta tensors that report a CUDA
    device, and ``torch.cuda.is_available()``, ``get_device_capability()`` and ``get_device_properties()``
    answer as that GPU would (launchers and autotune pruning ask them at call time)."""
    props = types.SimpleNamespace(**DEVICES[arch])
    patched = {
        "is_available": lambda: True,
        "get_device_capability": lambda device=None: (props.major, props.minor),
        "get_device_properties": lambda device=None: props,
        "get_device_name": lambda device=None: props.name,
        "current_device": lambda: 0,
        "device": lambda device=None: contextlib.nullcontext(),  # the launchers' device guard
    }
    saved = {name: getattr(torch.cuda, name) for name in patched}
    for name, fn in patched.items():
        setattr(torch.cuda, name, fn)
    try:
        with _CudaOnMeta():
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)


class Pointer:
    """What the JIT sees of a tensor argument: its dtype and its address.

    Allocations come from the caching allocator aligned to (at least) 256 bytes, so a tensor's address is
    aligned exactly as far as its storage offset in bytes is; ``data_ptr`` returns that offset from an
    aligned base, and the JIT's divisibility-by-16 specialization follows from it as on a GPU.
    """

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        self._address = (1 << 20) + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address

    def __repr__(self) -> str:
        return f"Pointer({self.dtype}, +{self._address % 256})"
