"""Rows of the compile gate: the checks that fail it, and the committed report files.

benchmarks/results/compile-<arch>-triton<version>.json:
``{"arch", "triton", "nvcc", "commit", "date", "rows": [{"family", "kernel", "source", "config", "compiled",
"regs", "spill_bytes", "shared_bytes", "wgmma", "wgmma_async", "wgmma_serialized", "ptxas_warnings", "mma_sync",
"tma"}]}`` and a readable .md beside it.
"""

from __future__ import annotations

import json
import os

# Shared memory a block may opt in to, in bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_LIMIT = {"90a": 232448, "80": 166912}
# Families whose Triton tl.dot must lower to wgmma on Hopper (the tensor-core heavy kernels).
WGMMA_FAMILIES = ("attention", "attention_varlen", "conv_transpose")
# Triton kernels named *_tma_kernel exist for Hopper's copy engine: on sm_90a their PTX must show TMA loads (a silent
# fallback to pointer loads would lose what they are for). Whether their wgmma overlap the softmax is each row's
# `wgmma_async` (the forward's head dims over 128 go one tile at a time, without it); serialized wgmma fail anywhere.
TMA_SUFFIX = "_tma_kernel"
FIELDS = ("family", "kernel", "source", "config", "compiled", "regs", "spill_bytes", "shared_bytes", "wgmma",
          "wgmma_async", "wgmma_serialized", "ptxas_warnings", "mma_sync", "tma")
_DEFAULTS = {"compiled": False, "wgmma_async": False, "wgmma_serialized": False, "ptxas_warnings": []}


# Findings the rows alone cannot show, printed in the .md of that arch (kept here so every regeneration keeps them).
NOTES = {"90a": """
## The Hopper forward's wgmma (`_fwd_tma_kernel`, issue 25)

Its earlier form issued the scores of tile j + 1 before the softmax of tile j and carried them, in flight, to the
next iteration. Its sm_90a build (bf16 d64 and d128, every kept config, triton 3.9 and 3.6) drew from ptxas
`(C7514) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions
reading accumulator registers of a wgmma between start and end of the pipeline stage`. The PTX shows why: the
loop's end copies the in-flight score registers (the phi of the carried tile, live beside the tile being
softmaxed) before any `wait_group` (d128, triton 3.9):

```
mov.b32   %r2441, %r524;        // ... 32 of them: the wgmma's result registers, still being written
@%p217 bra   $L__BB0_10;        // back to the loop's top
wgmma.wait_group.sync.aligned 0;
```

and ptxas then waits for every wgmma on its own (SASS, same kernel):

```
HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR20].tnspB, R24, gsb0 ;
UIADD3 UR22, UR13, 0x2000080, URZ ;
WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
```

Triton keeps a dot in flight only when its result is carried to the next iteration and read there after the
loop's first `wait_group 0`, and the P @ V of a rescaled accumulator is waited for at once (which waits for every
score tile issued before it too). A carried tile in flight thus needs registers of its own beside the tile being
softmaxed: with one carried tile that is the copy above. The kernel now goes by pairs of tiles with a register set
each: the next a-tile's scores run during the b-tile's softmax (half the tiles; k carried tiles would overlap
k - 1 softmaxes of k, each one more tile of registers, and d128 already holds 219), one wait per tile, nothing
serialized. In its SASS (d128, triton 3.9) ptxas interleaves that softmax with the score tile's HGMMAs:

```
HGMMA.64x64x16.F32.BF16 R120, gdesc[UR28], R120 ;   // next a-tile's scores, no wait after it
FMNMX R8, R160, R119, !PT ;                          // the b-tile's row max ...
FADD R98, R98, -R92.reuse ;
MUFU.EX2 R205, R98 ;                                 // ... and its exp2, before any WARPGROUP.DEPBAR
```

| `_fwd_tma_kernel`, bf16, M128 N64 8 warps 2 stages | regs | C75xx | HGMMA | waited at once | MUFU in flight |
|---|---:|---|---:|---:|---:|
| before, d64, triton 3.9 / 3.6 | 175 / 176 | C7514 / C7514 | 60 | 18 / 35 | (serialized) |
| before, d128, triton 3.9 / 3.6 | 214 / 208 | C7514 / C7514 | 96 | 32 / 54 | (serialized) |
| after, d64, triton 3.9 / 3.6 | 211 / 210 | none / none | 108 | 14 / 13 | 101 / 102 |
| after, d128, triton 3.9 / 3.6 | 219 / 212 | none / none | 168 | 13 / 11 | 102 / 102 |

("waited at once": HGMMAs whose next instruction is `WARPGROUP.DEPBAR`; in serialized code the others have only
address arithmetic before theirs. "MUFU in flight": MUFUs between an HGMMA and the DEPBAR that waits for it.
Head dim 256 goes one tile at a time: no overlap, nothing serialized. The pair loop's four streamed loads need
196,672 B of shared memory at d128 M128 N64 with 2 stages; 3 stages would need 262 KB and are not kept.)
"""}


def row(family: str, kernel: str, source: str, config: str, measured: dict) -> dict:
    """A report row; ``measured`` is a build result (compiled, regs, ...; ``error`` when it did not compile)."""
    out = {"family": family, "kernel": kernel, "source": source, "config": config}
    for name in FIELDS[4:]:
        out[name] = measured.get(name, _DEFAULTS.get(name))
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
        if r["wgmma_serialized"]:  # no kernel means its wgmma to wait for themselves one by one
            codes = ", ".join(sorted({w.split(":")[0] for w in r["ptxas_warnings"]}))
            messages.append(f"{where}: ptxas serializes its wgmma ({codes}): each waits for the last")
        if (arch == "90a" and r["source"] == "triton" and r["family"] in WGMMA_FAMILIES and r["mma_sync"]
                and not r["wgmma"]):
            messages.append(f"{where}: tl.dot lowers to {r['mma_sync']} mma.sync, no wgmma")
        if arch == "90a" and r["source"] == "triton" and r["kernel"].endswith(TMA_SUFFIX) and not r["tma"]:
            messages.append(f"{where}: expected TMA loads, found no cp.async.bulk.tensor")
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
        "(`cp.async.bulk.tensor`): instructions in the PTX; `ptxas`: the C75xx advisories ptxas printed;",
        "`serial`: ptxas serialized the wgmma (C7514/C7515: each waits for the last; the gate fails);",
        "`async`, read from the SASS (`cuobjdump -sass`): a wgmma group stays in flight while the warps go on",
        "(a `WARPGROUP.DEPBAR.LE gsb0, N>0`, or a `MUFU` between an `HGMMA` and the DEPBAR that waits for it),",
        "never where serialized.",
        "",
    ]
    if fails:
        lines += [f"## {len(fails)} failing check(s)", ""] + [f"- {m}" for m in fails] + [""]
    else:
        lines += ["## All checks pass", "", "Every config compiles, fits in shared memory and spills nothing"
                  + ("; attention and conv_transpose dots use wgmma." if arch == "90a" else "."), ""]
    if NOTES.get(arch):
        lines += [NOTES[arch].strip(), ""]
    lines += ["## Rows", "", "| family | kernel | source | config | ok | regs | spill | smem | wgmma | async | "
              "serial | ptxas | mma.sync | tma |", "|---|---|---|---|---|---:|---:|---:|---:|---|---|---|---:|---:|"]
    show = lambda v: "" if v is None else str(v)  # noqa: E731
    for r in rows:
        ok = "yes" if r["compiled"] else "**no**"
        codes = " ".join(sorted({w.split(":")[0] for w in r["ptxas_warnings"] or []}))
        lines.append(f"| {r['family']} | {r['kernel']} | {r['source']} | {r['config']} | {ok} | {show(r['regs'])} | "
                     f"{show(r['spill_bytes'])} | {show(r['shared_bytes'])} | {show(r['wgmma'])} | "
                     f"{'yes' if r['wgmma_async'] else ''} | {'**yes**' if r['wgmma_serialized'] else ''} | {codes} | "
                     f"{show(r['mma_sync'])} | {show(r['tma'])} |")
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
