"""Compile one captured Triton launch for a GPU target, as the JIT would, and read what the compiler made of it.

The specialization (argument types, constexprs, the divisibility-by-16 and ==1 attributes of pointers and ints)
comes from the JIT's own binder for that target, and the options from the backend's own parser, so a kernel
compiles here exactly as its first launch on such a GPU would compile it. Triton runs ``ptxas -v`` itself;
its log (registers, spill bytes, the C75xx performance advisories) is captured, the PTX is searched for the
instructions asked for, and the SASS (``cuobjdump -sass``) tells whether the wgmma really stay in flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import subprocess
import tempfile
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


# ptxas's performance advisories (C75xx), e.g. "(C7514) Potential Performance Loss: wgmma.mma_async instructions are
# serialized due to ...". C7514/C7515 mean ptxas made every wgmma of the function wait for itself.
PTXAS_ADVISORY = re.compile(r"\((C75\d\d)\)\s*(.*?)\s*$")
SERIALIZING = ("C7514", "C7515")


def ptxas_warnings(log: str) -> list[str]:
    """The C75xx lines of a ptxas log as "C7514: <text>" (without the tool's prefix, spaces collapsed), in order."""
    found = []
    for line in log.splitlines():
        if m := PTXAS_ADVISORY.search(line):
            found.append(f"{m.group(1)}: {' '.join(m.group(2).split())}")
    return found


def wgmma_serialized(warnings: list[str]) -> bool:
    return any(w.split(":")[0] in SERIALIZING for w in warnings)


def ptx_numbers(ptx: str) -> dict:
    """Tensor-core and TMA instructions in PTX text (what the compiler was asked for; whether the wgmma really stay
    in flight is read from the SASS, :func:`sass_numbers`)."""
    return {
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "tma": len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
    }


_SASS_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);")
_DEPBAR = re.compile(r"WARPGROUP\.DEPBAR\.LE\s+gsb0\s*,\s*(0x[0-9a-f]+|\d+)")


def sass_instructions(sass: str) -> list[str]:
    """The instructions of ``cuobjdump -sass`` text, in program order, without addresses and encodings."""
    return [m.group(1).strip() for m in _SASS_INSTRUCTION.finditer(sass)]


def wgmma_in_flight(sass: str) -> bool:
    """Whether, in the SASS (what runs, after ptxas), some wgmma stays in flight while the warps go on: a
    ``WARPGROUP.DEPBAR.LE gsb0, N`` with N > 0 (a pipelined matmul issues the next group before waiting for the
    last), or a MUFU (the softmax's exp2) issued after an HGMMA and before the DEPBAR that waits for it (ptxas
    interleaves it with the HGMMAs of attention's next score tile, or places it after their group's ``gsb0``).

    In serialized code every HGMMA is followed by its own DEPBAR, after at most a few address instructions, so
    this reads False there; the gate relies on ptxas's C7514/C7515 for serialization itself."""
    pending = False
    for ins in sass_instructions(sass):
        op = ins.split()[1] if ins.startswith("@") else ins.split()[0]
        if op.startswith("HGMMA"):
            pending = True
        elif m := _DEPBAR.search(ins):
            if int(m.group(1), 0) > 0:
                return True
            pending = False
        elif pending and op.startswith("MUFU"):
            return True
    return False


def sass_of(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin, with the cuobjdump the triton wheel ships."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


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
    warnings = ptxas_warnings(log.getvalue())
    serialized = wgmma_serialized(warnings)
    return {
        "compiled": True,
        "regs": numbers["regs"],
        "spill_bytes": numbers["spill_bytes"],
        "shared_bytes": int(kernel.metadata.shared) + numbers["static_shared"],
        **ptx_numbers(kernel.asm["ptx"]),
        # Serialized wgmma never overlap anything, whatever ptxas then schedules between them.
        "wgmma_async": not serialized and wgmma_in_flight(sass_of(kernel.asm["cubin"])),
        "wgmma_serialized": serialized,
        "ptxas_warnings": warnings,
    }
