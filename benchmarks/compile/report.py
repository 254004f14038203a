"""Rows of the compile gate: the checks that fail it, and the committed report files.

benchmarks/results/compile-<arch>-triton<version>.json:
``{"arch", "triton", "nvcc", "commit", "date", "rows": [{"family", "kernel", "source", "config", "compiled",
"regs", "spill_bytes", "shared_bytes", "wgmma", "wgmma_async", "mma_sync", "tma"}]}`` and a readable .md
beside it.
"""

from __future__ import annotations

import json
import os

# Shared memory a block may opt in to, in bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {"90a": 232448, "80": 166912}
# Families whose Triton tl.dot must lower to wgmma on Hopper (the tensor-core heavy kernels).
WGMMA_FAMILIES = ("attention", "attention_varlen", "conv_transpose")
# Triton kernels named *_tma_kernel exist for Hopper's copy engine and in-flight wgmma: on sm_90a their PTX must
# show both (a silent fallback to pointer loads or to waited-for wgmma would lose what they are for).
TMA_SUFFIX = "_tma_kernel"
FIELDS = ("family", "kernel", "source", "config", "compiled", "regs", "spill_bytes", "shared_bytes", "wgmma",
          "wgmma_async", "mma_sync", "tma")


def row(family: str, kernel: str, source: str, config: str, measured: dict) -> dict:
    """A report row; ``measured`` is a build result (compiled, regs, ...; ``error`` when it did not compile)."""
    out = {"family": family, "kernel": kernel, "source": source, "config": config}
    for name in FIELDS[4:]:
        out[name] = measured.get(name, False if name in ("compiled", "wgmma_async") else None)
    if measured.get("error"):
        out["error"] = measured["error"]
    return out


def failures(rows: list[dict], arch: str) -> list[str]:
    """One message per failing row, naming kernel, config and the number that fails."""
    limit = SHARED_LIMIT[arch]
    messages = []
    for r in rows:
        where = f"sm_{arch} {r['source']} {r['family']}/{r['kernel']} [{r['config']}]"
        if not r["compiled"]:
            messages.append(f"{where}: does not compile: {r.get('error', 'unknown error')}")
            continue
        if r["shared_bytes"] is not None and r["shared_bytes"] > limit:
            messages.append(f"{where}: needs {r['shared_bytes']} B of shared memory, over the {limit} B limit")
        if r["spill_bytes"]:
            messages.append(f"{where}: spills {r['spill_bytes']} B of registers (uses {r['regs']} registers)")
        if (arch == "90a" and r["source"] == "triton" and r["family"] in WGMMA_FAMILIES and r["mma_sync"]
                and not r["wgmma"]):
            messages.append(f"{where}: tl.dot lowers to {r['mma_sync']} mma.sync, no wgmma")
        if (arch == "90a" and r["source"] == "triton" and r["kernel"].endswith(TMA_SUFFIX)
                and not (r["tma"] and r["wgmma_async"])):
            in_flight = "in flight" if r["wgmma_async"] else "never in flight"
            found = f"{r['tma'] or 0} cp.async.bulk.tensor, wgmma {in_flight}"
            messages.append(f"{where}: expected TMA loads and async wgmma, found {found}")
    return messages


def report_stem(results_dir: str, arch: str, triton_version: str) -> str:
    return os.path.join(results_dir, f"compile-sm{arch}-triton{triton_version}")


def to_json(meta: dict, rows: list[dict]) -> dict:
    return {**{k: meta[k] for k in ("arch", "triton", "nvcc", "commit", "date")},
            "rows": [{k: r[k] for k in FIELDS} for r in rows]}


def same_rows(path: str, report: dict) -> bool:
    """Whether ``path`` already holds these rows (then it is left alone: no churn from date and commit)."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return False
    keep = ("arch", "triton", "nvcc", "rows")
    return {k: old.get(k) for k in keep} == {k: report[k] for k in keep}


def markdown(report: dict, rows: list[dict]) -> str:
    arch = report["arch"]
    fails = failures(rows, arch)
    lines = [
        f"# Compile report: sm_{arch}, triton {report['triton']}, nvcc {report['nvcc']}",
        "",
        f"commit {report['commit']}, {report['date']}. Written by `python -m benchmarks.compile` (`make test`).",
        "",
        "Every Triton kernel of genfast/kernels with every config its autotuner or launch heuristic can pick, and",
        "every csrc/cuda kernel, compiled for this GPU without one. `regs`/`spill` (spill stores + loads, bytes)",
        "from `ptxas -v`; `smem`: shared memory per block in bytes (Triton: what the kernel needs at launch;",
        f"CUDA: static shared memory only), limit {SHARED_LIMIT[arch]} B; `wgmma`, `mma.sync`, `tma`",
        "(`cp.async.bulk.tensor`): instructions in the PTX; `async`: wgmma groups stay in flight while the",
        "warps go on (a `wgmma.wait_group N>0`, or `ex2` between a `wgmma.commit_group` and the next wait).",
        "",
    ]
    if fails:
        lines += [f"## {len(fails)} failing check(s)", ""] + [f"- {m}" for m in fails] + [""]
    else:
        lines += ["## All checks pass", "", "Every config compiles, fits in shared memory and spills nothing"
                  + ("; attention and conv_transpose dots use wgmma." if arch == "90a" else "."), ""]
    lines += ["## Rows", "", "| family | kernel | source | config | ok | regs | spill | smem | wgmma | async | "
              "mma.sync | tma |", "|---|---|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
    show = lambda v: "" if v is None else str(v)  # noqa: E731
    for r in rows:
        ok = "yes" if r["compiled"] else "**no**"
        lines.append(f"| {r['family']} | {r['kernel']} | {r['source']} | {r['config']} | {ok} | {show(r['regs'])} | "
                     f"{show(r['spill_bytes'])} | {show(r['shared_bytes'])} | {show(r['wgmma'])} | "
                     f"{'yes' if r['wgmma_async'] else ''} | {show(r['mma_sync'])} | {show(r['tma'])} |")
    return "\n".join(lines) + "\n"


def write(results_dir: str, meta: dict, rows: list[dict]) -> str:
    """Write the .json and .md of one (arch, triton) report unless they already hold these rows; the stem."""
    report = to_json(meta, rows)
    stem = report_stem(results_dir, meta["arch"], meta["triton"])
    if not same_rows(stem + ".json", report):
        os.makedirs(results_dir, exist_ok=True)
        with open(stem + ".json", "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
        with open(stem + ".md", "w") as f:
            f.write(markdown(report, rows))
    return stem


def read(path: str) -> dict:
    with open(path) as f:
        report = json.load(f)
    missing = [k for k in ("arch", "triton", "nvcc", "commit", "date", "rows") if k not in report]
    if missing:
        raise ValueError(f"{path}: not a compile report (missing {', '.join(missing)})")
    for i, r in enumerate(report["rows"]):
        if set(r) != set(FIELDS):
            raise ValueError(f"{path}: row {i} has fields {sorted(r)}, expected {list(FIELDS)}")
    return report
