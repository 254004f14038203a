"""The sanitizer's workload: a small call of every op of each family, under every backend that serves it.

``python -m benchmarks.gpu_check.workload --device cuda --families attention,sampling`` runs, per family and per
backend (on a GPU: ``cuda`` and ``triton``, each for the ops that have such a kernel; on the CPU, for the dry run:
``cpu``, ``triton`` in its interpreter and ``reference``), each op at odd sizes (``SIZES``, ``DTYPES``), forward
and backward where the op has one. ``auto`` alone would leave half the kernels unchecked (it picks one backend per
call), so backends are chosen by name. Each (family, backend) is framed by marker lines that the sanitizer's output
is cut by (``phases.sanitizer_verdicts``), and followed by the Triton kernels it launched, which must all be in the
sanitizer's kernel filter (``plan.TRITON_KERNELS``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable

import torch

MARK = "gpu-check workload:"
# Kernel backends per device type, in the order they run; the reference runs only on the CPU (the dry run), where it
# is one of the three backends there is, and on a GPU it launches no genfast kernel.
BACKENDS = {"cuda": ("cuda", "triton"), "cpu": ("cpu", "triton", "reference")}
# Odd sizes, each dtype; on the CPU, where Triton runs in its interpreter, smaller sizes in fp32 alone (the dry run
# proves that the workload runs under every backend; the GPU run checks the kernels): sequence length, head dim,
# channels, image side, vocabulary.
DTYPES = {"cuda": (torch.bfloat16, torch.float16, torch.float32), "cpu": (torch.float32,)}
SIZES = {"cuda": {"n": 97, "d": 64, "c": 17, "hw": 9, "vocab": 1001},
         "cpu": {"n": 19, "d": 16, "c": 5, "hw": 5, "vocab": 101}}


def _size(dev: torch.device, name: str) -> int:
    return SIZES[dev.type][name]


def _attention(dev, dtype, g, r):
    from genfast import ops

    n, d = _size(dev, "n"), _size(dev, "d")
    q, k = r(2, 4, n, d).requires_grad_(), r(2, 2, n, d).requires_grad_()
    ops.attention(q, k, k, causal=True).sum().backward()


def _attention_varlen(dev, dtype, g, r):
    from genfast import ops

    q = r(40, 4, _size(dev, "d")).requires_grad_()
    cu = torch.tensor([0, 17, 18, 40], device=dev, dtype=torch.int32)
    ops.attention_varlen(q, q, q, cu, cu, 22, 22, causal=True).sum().backward()


def _attention_decode(dev, dtype, g, r):
    from genfast import ops

    n, d = _size(dev, "n"), _size(dev, "d")
    cache = r(3, 2, n, d)
    lengths = torch.tensor([1, n // 2, n - 1], device=dev, dtype=torch.int32)
    ops.attention_decode(r(3, 8, 1, d), cache, cache, lengths)


def _kv_cache_append(dev, dtype, g, r):
    from genfast import ops

    n, d = _size(dev, "n"), _size(dev, "d")
    cache = r(3, 2, n, d)
    lengths = torch.tensor([1, n // 2, n - 1], device=dev, dtype=torch.int32)
    ops.kv_cache_append(cache, cache.clone(), r(3, 2, 1, d), r(3, 2, 1, d), lengths)


def _conv_transpose2d(dev, dtype, g, r):
    from genfast import ops

    c, hw = _size(dev, "c"), _size(dev, "hw")
    x, w = r(2, c, hw, hw).requires_grad_(), r(c, 5, 4, 4)
    ops.conv_transpose2d(x, w, r(5), stride=2, padding=1, activation="relu").sum().backward()


def _sample_tokens(dev, dtype, g, r):
    from genfast import ops

    ops.sample_tokens(r(3, _size(dev, "vocab")), temperature=0.8, top_k=17, top_p=0.9, generator=g)


def _filter_logits(dev, dtype, g, r):
    from genfast import ops

    ops.filter_logits(r(3, _size(dev, "vocab")), top_p=0.5)


def _scheduler_step(dev, dtype, g, r):
    from genfast import ops

    x = r(2, 3, 17, 17)
    ops.scheduler_step(x, r(2, 3, 17, 17), torch.rand(11, device=dev, generator=g), generator=g)


def _cfg_combine(dev, dtype, g, r):
    from genfast import ops

    ops.cfg_combine(r(2, 3, 17, 17), r(2, 3, 17, 17), 3.0)


def _reparameterize(dev, dtype, g, r):
    from genfast import ops

    mu, logvar = r(3, 97).requires_grad_(), r(3, 97).requires_grad_()
    ops.reparameterize(mu, logvar, generator=g).sum().backward()


def _gaussian_kl(dev, dtype, g, r):
    from genfast import ops

    mu, logvar = r(3, 97).requires_grad_(), r(3, 97).requires_grad_()
    ops.gaussian_kl(mu, logvar).sum().backward()


def _langevin_step(dev, dtype, g, r):
    from genfast import ops

    ops.langevin_step(r(3, 97), r(3, 97), 0.01, 0.1, generator=g)


def _philox_noise(dev, dtype, g, r):
    from genfast import ops

    if dtype == torch.float32:  # its output is always fp32: once is enough
        ops.philox_noise(7, 1001, normal=True, device=dev)


def _lstm_cell(dev, dtype, g, r):
    from genfast import ops

    x_gates, h_gates, c = r(3, 4 * 97).requires_grad_(), r(3, 4 * 97).requires_grad_(), r(3, 97).requires_grad_()
    h, c_new = ops.lstm_cell(x_gates, h_gates, c)
    (h.float().sum() + c_new.float().sum()).backward()


# family -> [(public op, as named in genfast's dispatchers), the call]
CALLS: dict[str, list[tuple[str, Callable]]] = {
    "attention": [("attention", _attention)],
    "attention_varlen": [("attention_varlen", _attention_varlen)],
    "attention_decode": [("attention_decode", _attention_decode), ("kv_cache_append", _kv_cache_append)],
    "conv_transpose": [("conv_transpose2d", _conv_transpose2d)],
    "sampling": [("sample_tokens", _sample_tokens), ("filter_logits", _filter_logits)],
    "diffusion": [("scheduler_step", _scheduler_step), ("cfg_combine", _cfg_combine)],
    "latent": [("reparameterize", _reparameterize), ("gaussian_kl", _gaussian_kl), ("langevin_step", _langevin_step)],
    "random": [("philox_noise", _philox_noise)],
    "lstm": [("lstm_cell", _lstm_cell)],
}


def backends(family: str, device_type: str) -> list[str]:
    """The backends the workload runs ``family`` under on ``device_type``: those of BACKENDS[device_type] that
    serve at least one of its ops (the reference serves all). Reads genfast's dispatchers."""
    from genfast import _backend

    registered = set().union(*(_backend.DISPATCHERS[op].impls for op, _ in CALLS[family])) | {"reference"}
    return [b for b in BACKENDS[device_type] if b in registered]


@contextlib.contextmanager
def launched_triton_kernels():
    """Yield a set that fills with the names of the Triton kernels launched inside (compiled or interpreted)."""
    names: set[str] = set()
    patched = []
    try:
        from triton.runtime import interpreter, jit
    except ImportError:
        yield names
        return
    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            names.add(self.fn.__name__)
            return _original(self, *args, **kwargs)

        cls.run = run
        patched.append((cls, original))
    try:
        yield names
    finally:
        for cls, original in patched:
            cls.run = original


def run_family(family: str, backend: str, device: str) -> list[str]:
    """Every op of ``family`` that ``backend`` serves, in each dtype, forward and backward. Returns the calls the
    backend declined by name (a dtype it does not serve: ``BackendError`` with its reason), which are not errors."""
    import genfast
    from genfast import _backend

    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    declined = []
    for op, call in CALLS[family]:
        if backend != "reference" and backend not in _backend.DISPATCHERS[op].impls:
            continue  # this op has no such kernel: the family's other backend checks it
        for dtype in DTYPES[dev.type]:
            def r(*shape, dtype=dtype):
                return torch.randn(*shape, device=dev, generator=g).to(dtype)

            try:
                with genfast.backend(backend):
                    call(dev, dtype, g, r)
            except _backend.BackendError as error:
                declined.append(f"{op} {str(dtype).replace('torch.', '')}: {error}")
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return declined


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--families", required=True, help="comma-separated")
    args = parser.parse_args(argv)
    import genfast  # noqa: F401  (loads the ops and their dispatchers)

    failed = 0
    for family in args.families.split(","):
        for backend in backends(family, args.device):
            print(f"{MARK} {family} {backend} start", flush=True)
            with launched_triton_kernels() as kernels:
                try:
                    declined = run_family(family, backend, args.device)
                except Exception as error:  # the next family still runs; no "done" marker: the parent fails it
                    print(f"{MARK} {family} {backend} raised {type(error).__name__}: {error}", flush=True)
                    failed += 1
                    continue
            for line in declined:
                print(f"{MARK} {family} {backend} declined {line}", flush=True)
            print(f"{MARK} {family} {backend} kernels {','.join(sorted(kernels)) or '-'}", flush=True)
            print(f"{MARK} {family} {backend} done", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
