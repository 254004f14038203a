"""Compile one captured Triton launch for a GPU target, as the JIT would, and read what the compiler made of it.

The specialization (argument types, constexprs, the divisibility-by-16 and ==1 attributes of pointers and ints)
comes from the JIT's own binder for that target, and the options from the backend's own parser, so a kernel
compiles here exactly as its first launch on such a GPU would compile it. Triton runs ``ptxas -v`` itself;
its log (registers, spill bytes) is captured, and the PTX is searched for the instructions that matter.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from benchmarks.compile.capture import Launch

# Compute capability of each gated architecture ("90a": Hopper with its wgmma/TMA features).
CAPABILITY = {"90a": 90, "80": 80}


def target(arch: str) -> GPUTarget:
    return GPUTarget("cuda", CAPABILITY[arch], 32)


def specialize(launch: Launch, arch: str):
    """(ASTSource, options, backend) of ``launch`` for ``arch``: the JIT's binder and argument packing."""
    backend = make_backend(target(arch))
    fn = launch.fn
    kwargs = {"debug": False, **launch.kwargs}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options, backend


# This file's own text enters the cache key: a cached row holds what this code read from the compiler's output,
# so a change to how rows are measured (a new PTX count, another log pattern) measures every kernel again.
with open(__file__, "rb") as _self:
    _MEASURING_CODE = hashlib.sha256(_self.read()).hexdigest()


def cache_key(launch: Launch, arch: str) -> str:
    """Triton's own cache key (source of the kernel and every function it calls, specialization, options,
    target and ptxas version) and this file's: a kernel nobody changed is not compiled again."""
    from triton.runtime.cache import get_cache_key

    src, options, backend = specialize(launch, arch)
    key = get_cache_key(src, backend, options, env_vars={}) + _MEASURING_CODE
    return hashlib.sha256(key.encode()).hexdigest()


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_numbers(log: str) -> dict:
    """Registers, spill bytes (stores + loads) and static shared memory of the (single) function in a
    ``ptxas -v`` log."""
    regs = [int(m) for m in _REGS.findall(log)]
    spills = [int(s) + int(ld) for s, ld in _SPILLS.findall(log)]
    smem = [int(m) for m in _SMEM.findall(log)]
    return {"regs": max(regs) if regs else None, "spill_bytes": sum(spills) if spills else None,
            "static_shared": sum(smem)}


_WAIT_GROUP = re.compile(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)")


def _math_in_flight(ptx: str) -> bool:
    """Whether some committed wgmma group is still pending while the warpgroup runs ``ex2`` (a softmax): a
    ``wgmma.commit_group`` followed by ``ex2`` before the next ``wgmma.wait_group``, in program order."""
    pending = False
    for line in ptx.splitlines():
        if "wgmma.commit_group" in line:
            pending = True
        elif "wgmma.wait_group" in line:
            pending = False
        elif pending and "ex2.approx" in line:
            return True
    return False


def ptx_numbers(ptx: str) -> dict:
    """Tensor-core and TMA instructions in PTX text.

    ``wgmma_async``: wgmma groups stay in flight while the warpgroup goes on: some ``wgmma.wait_group N`` has
    N > 0 (the pipelined matmul form), or a group is committed and the softmax's ``ex2`` runs before the next
    wait (attention issuing the next tile's scores before this tile's softmax; Triton then waits with N = 0 at
    the next iteration's top). Otherwise each wgmma is waited for at once.
    """
    return {
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "wgmma_async": any(int(n) > 0 for n in _WAIT_GROUP.findall(ptx)) or _math_in_flight(ptx),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "tma": len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
    }


def build(launch: Launch, arch: str, cache_dir: str | None = None) -> dict:
    """Compile ``launch`` for ``arch``; the row's measured fields, or compiled=False with the error."""
    try:
        key = cache_key(launch, arch)
    except Exception as error:  # the specialization itself failed: report it as a compile failure
        return {"compiled": False, "error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}
    path = os.path.join(cache_dir, f"{key}.json") if cache_dir else None
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    start = time.perf_counter()
    row = _compile(launch, arch)
    row["seconds"] = round(time.perf_counter() - start, 1)  # kept in the cache, never in the report
    if path and row["compiled"]:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(row, f)
        os.replace(tmp, path)
    return row


def _compile(launch: Launch, arch: str) -> dict:
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # Triton prints the log of the `ptxas -v` it runs
    knobs.compilation.always_compile = True  # a hit in Triton's own cache would skip ptxas and its log
    log = io.StringIO()
    try:
        src, options, _ = specialize(launch, arch)
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=target(arch), options=options.__dict__)
    except Exception as error:
        text = f"{type(error).__name__}: {error}".strip()
        lines = [line for line in text.splitlines() if line.strip()]
        return {"compiled": False, "error": " | ".join(lines[:3])[:400]}
    numbers = ptxas_numbers(log.getvalue())
    row = {
        "compiled": True,
        "regs": numbers["regs"],
        "spill_bytes": numbers["spill_bytes"],
        "shared_bytes": int(kernel.metadata.shared) + numbers["static_shared"],
        **ptx_numbers(kernel.asm["ptx"]),
    }
    return row
