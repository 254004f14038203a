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

# Under pytest-xdist (`make test` runs -n <cores>) each worker is a process of its own, by default with one intra-op
# thread per core: together they would oversubscribe the cores (tiny ops then run up to 10x slower), so each worker
# takes its share of them instead.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _XDIST_WORKERS))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def serving_backends(op: str, device: str) -> list[str]:
    """The genfast kernel backends (not the reference) that can serve ``op`` on ``device`` here."""
    dispatch = _backend.DISPATCHERS[op]
    return [b for b in ("cpu", "cuda", "triton") if dispatch.why_not(b, torch.device(device)) is None]


def backend_params(op: str) -> list:
    """pytest params (device, backend) for every kernel backend that can serve ``op`` on this machine."""
    return [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in serving_backends(op, d)]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole test module (its module-scoped fixtures too), restored after it.

    Tiny matmuls and convolutions on a shared 2-core machine: two intra-op threads spin against each other and run up
    to 10x slower than one. A module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _restore_backend():
    before = genfast.get_backend()
    yield
    genfast.set_backend(before)
