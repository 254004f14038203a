"""Every csrc/cuda/*.cu through nvcc for a target, with ``-Xptxas -v``: one row per kernel.

The flags are those of the build plus ``-Werror all-warnings``, so a warning fails too. The PTX is kept
(``--keep``) and cut at each ``.entry`` to count each kernel's tensor-core and TMA instructions; ptxas's C75xx
advisories and the object's SASS (``cuobjdump -sass``) give each kernel's wgmma_serialized and wgmma_async.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile

from benchmarks.compile.triton_build import (
    PTXAS_ADVISORY,
    ptx_numbers,
    ptxas_warnings,
    wgmma_in_flight,
    wgmma_serialized,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release [\d.]+, V([\d.]+)", out)
    return match.group(1) if match else "unknown"


def sources() -> list[str]:
    return sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_\w+'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


_IN_FUNCTION = re.compile(r"in the function '([^']+)'")


def parse_ptxas(log: str) -> dict[str, dict]:
    """Mangled kernel name -> regs, spill_bytes (stores + loads), shared_bytes (static) and ptxas_warnings (its
    C75xx advisories: a line names its function, else the entry being compiled) from a -Xptxas -v log."""
    kernels: dict[str, dict] = {}

    def entry(name: str) -> dict:
        return kernels.setdefault(name, {"regs": None, "spill_bytes": 0, "shared_bytes": 0, "ptxas_warnings": []})

    current = None
    for line in log.splitlines():
        if PTXAS_ADVISORY.search(line):  # printed before the entry line of the function it names
            named = _IN_FUNCTION.search(line)
            target = entry(named.group(1)) if named else current
            if target is not None:
                target["ptxas_warnings"] += ptxas_warnings(line)
        elif m := _ENTRY.search(line):
            current = entry(m.group(1))
        elif current is not None and (m := _PROPS.search(line)):
            current["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        elif current is not None and (m := _USED.search(line)):
            current["regs"] = int(m.group(1))
            current["shared_bytes"] = int(m.group(2) or 0)
    return kernels


def ptx_entries(ptx: str) -> dict[str, str]:
    """Mangled kernel name -> its PTX text (from its ``.entry`` to the next)."""
    parts = re.split(r"(?=^\.(?:visible\s+)?\.?entry\s)", ptx, flags=re.M)
    out = {}
    for part in parts:
        if m := re.match(r"\.(?:visible\s+)?\.?entry\s+(\S+?)\s*\(", part):
            out[m.group(1)] = part
    return out


def sass_functions(sass: str) -> dict[str, str]:
    """Mangled kernel name -> its part of ``cuobjdump -sass`` text (from its ``Function :`` line to the next)."""
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt") or "c++filt"
    try:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return dict(zip(names, out.splitlines()))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def family_of(source: str, kernel: str) -> str:
    """The report family of a kernel of csrc/cuda/<source>.cu (attention.cu also holds decode and varlen)."""
    stem = os.path.splitext(os.path.basename(source))[0]
    if stem == "attention":
        if "decode" in kernel or "append" in kernel:
            return "attention_decode"
        if "varlen" in kernel:
            return "attention_varlen"
    return stem


def short_kernel(demangled: str) -> tuple[str, str]:
    """(kernel name, template arguments) from ``void genfast::cuda::(anon)::name<T, 128>(args)``."""
    head = demangled.replace("(anonymous namespace)", "anon").split("(")[0]
    name, _, template = head.partition("<")
    name = name.split("::")[-1].replace("void ", "").strip()
    return name, template.rstrip(">").strip()


def build(source: str, arch: str, nvcc: str) -> list[dict]:
    """Rows (family, kernel, config, measured fields) of one .cu for ``arch``; one failing row if nvcc fails."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-std=c++17", "-O2", "-Xcompiler", "-Wall", "-Werror", "all-warnings", "-gencode",
               f"arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v", "--keep", "--keep-dir", tmp, "-c", source,
               "-o", os.path.join(tmp, "out.o")]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        name = os.path.basename(source)
        if done.returncode != 0:
            error = " | ".join([ln for ln in (done.stderr + done.stdout).splitlines() if "error" in ln][:3])
            return [{"family": family_of(source, ""), "kernel": name, "config": "nvcc",
                     "measured": {"compiled": False, "error": error or f"nvcc exit {done.returncode}"}}]
        ptx_files = glob.glob(os.path.join(tmp, "*.ptx"))
        ptx = open(ptx_files[0]).read() if ptx_files else ""
        sass = sass_functions(sass_of_object(os.path.join(tmp, "out.o")))
    resources = parse_ptxas(done.stderr + done.stdout)
    entries = ptx_entries(ptx)
    readable = demangle(list(resources))
    rows = []
    for mangled, numbers in sorted(resources.items(), key=lambda kv: readable[kv[0]]):
        kernel, template = short_kernel(readable[mangled])
        serialized = wgmma_serialized(numbers["ptxas_warnings"])
        rows.append({"family": family_of(source, kernel), "kernel": f"{name}:{kernel}", "config": template,
                     "measured": {"compiled": True, **numbers, **ptx_numbers(entries.get(mangled, "")),
                                  "wgmma_serialized": serialized,
                                  "wgmma_async": not serialized and wgmma_in_flight(sass.get(mangled, ""))}})
    return rows


def sass_of_object(path: str) -> str:
    """``cuobjdump -sass`` of an object file, with the cuobjdump the triton wheel ships."""
    from triton import knobs

    return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True, text=True,
                          check=True).stdout
