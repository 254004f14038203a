"""Where a drop-in's time goes beyond its peer's: `python -m benchmarks.profile_replaced [--family F] [--match S]`.

For each "replaced" row (``harness.ReplacedCase``, the same rows and the same two calls ``benchmarks.run
--replaced`` times), runs genfast's call and the call it replaces under ``torch.profiler``, a few times each,
and sets the two profiles side by side by operator: the aten ops genfast's call runs that the peer's does not
(or runs for longer), each with its self CPU time per call. That is the overhead a drop-in adds on top of the
torch kernel it shares with its peer (issue 26: "no full-tensor passes beyond the one the peer makes, no
per-call Python work that scales with the tensors"): a NaN check, a mask copy, a cast, an extra ``contiguous``.

Writes ``benchmarks/results/profiles/<device>-<date>-<commit>.md`` (``--out`` for another folder) and prints it.
The profiler's own cost per op inflates small ops alike on both sides; read the per-op differences, not the
totals, as the result (the totals are the ones ``benchmarks.run --replaced`` measures without a profiler).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from benchmarks import harness, report, run
from genfast._io import write_atomic

RESULTS = os.path.join(harness.RESULTS_DIR, "profiles")
CALLS = 5  # profiled calls per side, after the harness's warm-up
SHOWN = 6  # ops listed per row
NOISE_MS = 0.002  # per-call differences below this are left out (the profiler's own noise on 2 cores)


def self_ms_by_op(fn, calls: int = CALLS) -> dict[str, float]:
    """{aten op: self CPU ms per call} over ``calls`` profiled calls of ``fn``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    by_op: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        by_op[event.key] += event.self_cpu_time_total / 1e3 / calls
    return dict(by_op)


def excess_ops(ours: dict[str, float], theirs: dict[str, float]) -> list[tuple[str, float, float]]:
    """The ops where genfast's call spends more self time than the peer's, largest excess first:
    (op, genfast ms per call, peer ms per call)."""
    rows = [(op, ms, theirs.get(op, 0.0)) for op, ms in ours.items() if ms - theirs.get(op, 0.0) > NOISE_MS]
    return sorted(rows, key=lambda row: row[2] - row[1])


def profile_row(case: harness.ReplacedCase) -> dict:
    ours, theirs = case.setup()
    for _ in range(2):  # the harness's warm-up: lazy builds, caches, allocator
        ours()
        theirs()
    mine, peer = self_ms_by_op(ours), self_ms_by_op(theirs)
    return {"case": case, "genfast_ms": sum(mine.values()), "before_ms": sum(peer.values()),
            "excess": excess_ops(mine, peer)}


def markdown(rows: list[dict], env: dict) -> list[str]:
    lines = [f"# Profiles of the replaced rows, {env['device']}, commit {env['commit']}, {env['date']}", "",
             "`python -m benchmarks.profile_replaced`: self CPU time per call of the aten ops that genfast's call "
             f"runs beyond its peer's ({CALLS} profiled calls each; differences under {NOISE_MS * 1e3:.0f} us "
             "left out). Totals are the profiled self times, profiler overhead included; the timings without a "
             "profiler are `benchmarks.run --replaced`'s.", "",
             "| drop-in | case | genfast ms | before ms | ops genfast adds or spends longer in (genfast / before ms) |",
             "|---|---|---:|---:|---|"]
    for row in rows:
        case = row["case"]
        extra = "; ".join(f"`{op}` {ms:.3f} / {theirs:.3f}" for op, ms, theirs in row["excess"][:SHOWN]) or "none"
        lines.append(f"| `{case.drop_in}` | {case.case} | {row['genfast_ms']:.3f} | {row['before_ms']:.3f} | {extra} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="append", help="only this family (repeatable)")
    parser.add_argument("--match", default=None, help="only rows whose drop-in or case contains this text")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--out", default=RESULTS, help="folder of the .md (default benchmarks/results/profiles)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cases = [case for case in run.collect_replaced(device, args.family, quick=False)
             if args.match is None or args.match in case.drop_in or args.match in case.case]
    if not cases:
        parser.error(f"--family/--match select no replaced row (families: {[f for f, _ in run.bench_modules(None)]})")
    env = harness.environment(device)
    rows = [profile_row(case) for case in tqdm(cases, desc="profiled", unit="row")]
    text = "\n".join(markdown(rows, env)) + "\n"
    print(text)
    if not args.no_write:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, report.stem_name(env) + ".md")
        write_atomic(path, text.encode())
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
