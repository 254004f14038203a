"""Test set-up: Triton runs in its interpreter on machines without a GPU.

TRITON_INTERPRET must be set before Triton kernels are defined, i.e. before genfast is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import genfast  # noqa: E402
from genfast import _backend  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def serving_backends(op: str, device: str) -> list[str]:
    """The genfast kernel backends (not the reference) that can serve ``op`` on ``device`` here."""
    dispatch = _backend.DISPATCHERS[op]
    return [b for b in ("cpu", "cuda", "triton") if dispatch.why_not(b, torch.device(device)) is None]


def backend_params(op: str) -> list:
    """pytest params (device, backend) for every kernel backend that can serve ``op`` on this machine."""
    return [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in serving_backends(op, d)]


@pytest.fixture(autouse=True)
def _restore_backend():
    before = genfast.get_backend()
    yield
    genfast.set_backend(before)
