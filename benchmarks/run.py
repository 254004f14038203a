"""Run the benchmark suite: `make bench` or `python -m benchmarks.run [--family F] [--quick] [--publish]`.

Only the "replaced" rows (genfast's default call against what it replaces, alternating; about 10 minutes on 2 cores):
`python -m benchmarks.run --replaced` (add `--family attention` for one family's).

Times every case of every benchmarks/bench_<family>.py on the device present (CUDA if available,
else the CPU), prints the summary of ratios measured in this run (benchmarks/report.py), and writes
<device>-<date>-<commit>.json with its .md and one .png per family into benchmarks/results/local/
(ignored by git), or into benchmarks/results/ with --publish, for a run meant to be committed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time

import torch

from benchmarks import harness, report


def bench_modules(families: list[str] | None):
    package_dir = os.path.dirname(os.path.abspath(__file__))
    for info in sorted(pkgutil.iter_modules([package_dir]), key=lambda m: m.name):
        if info.name.startswith("bench_"):
            family = info.name[len("bench_"):]
            if families is None or family in families:
                yield family, importlib.import_module(f"benchmarks.{info.name}")


def collect_cases(device: torch.device, families: list[str] | None, quick: bool) -> list[harness.BenchCase]:
    cases = []
    for _, module in bench_modules(families):
        cases.extend(module.cases(device, quick=quick))
    return cases


def collect_replaced(device: torch.device, families: list[str] | None, quick: bool) -> list[harness.ReplacedCase]:
    cases = []
    for _, module in bench_modules(families):
        if hasattr(module, "replaced"):
            cases.extend(module.replaced(device, quick=quick))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="append", help="only this family (repeatable): e.g. sampling")
    parser.add_argument("--quick", action="store_true", help="small cases and short timing, for a smoke run")
    parser.add_argument("--smoke", action="store_true", help="with --quick: every case built, the first of each "
                        "family run once, no replaced rows (make gpu-check-dry)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--no-write", action="store_true", help="print the summary only")
    parser.add_argument("--publish", action="store_true",
                        help="write into benchmarks/results/ (committed) instead of benchmarks/results/local/")
    parser.add_argument("--out", help="write into this folder instead (e.g. make gpu-check's)")
    parser.add_argument("--name", help="file name stem (default <device>-<date>-<commit>)")
    parser.add_argument("--one-figure", action="store_true", help="one figure with a panel per family")
    parser.add_argument("--replaced", action="store_true",
                        help="only the 'replaced' rows: each drop-in against what it replaces, the two alternating "
                             "every repetition (about 10 minutes on 2 cores)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timing = {"min_time_s": 0.05, "max_reps": 20} if args.quick else {}
    env = harness.environment(device)
    cases = [] if args.replaced else collect_cases(device, args.family, args.quick)
    swaps = collect_replaced(device, args.family, args.quick)
    if args.smoke:
        firsts: dict = {}
        cases = [firsts.setdefault(c.family, c) for c in cases if c.family not in firsts]
        swaps, timing = [], {"min_time_s": 0.0, "max_reps": 1, "warmup": 0}
    if not cases and not swaps:
        print("no benchmark cases selected", file=sys.stderr)
        return 1
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; stay usable without it all the same
        tqdm = lambda xs, **_: xs  # noqa: E731

    print(f"genfast benchmarks on {env['device']}: {len(cases)} timings, {len(swaps)} replaced rows", flush=True)
    ceilings = harness.ceilings(device)
    results = []
    for case in tqdm(cases, desc="benchmarks", unit="case"):
        try:
            results.append(harness.measure(case, device, **timing))
        except Exception as error:  # one failing provider must not lose the rest of the run
            print(f"\n{case.name}: FAILED ({type(error).__name__}: {error})", file=sys.stderr)
    replaced = []
    for swap in tqdm(swaps, desc="replaced", unit="row"):
        try:
            replaced.append(harness.measure_replaced(swap, device))
            row = replaced[-1]
            print(f"\n{swap.name}: {row['ratio']:.2f}x ({row['genfast_ms']:.3f} vs {row['before_ms']:.3f} ms)",
                  flush=True)  # as it goes: a long run interrupted still shows its rows
        except Exception as error:  # as above: one failing row must not lose the rest
            print(f"\n{swap.name}: FAILED ({type(error).__name__}: {error})", file=sys.stderr)
    data = {**env, "ceilings": ceilings, "results": results, "replaced": replaced,
            "duration_s": round(time.perf_counter() - started)}
    print("\n".join(report.summary_markdown(data, report.comparisons(results)) + report.replaced_markdown(data)))
    print(f"the suite took {data['duration_s'] / 60:.1f} min")
    if not args.no_write:
        folder = args.out or (harness.RESULTS_DIR if args.publish else os.path.join(harness.RESULTS_DIR, "local"))
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, (args.name or report.stem_name(data)) + ".json")
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
        written = [path] + report.write(path, one_figure=args.one_figure)
        print("wrote " + ", ".join(os.path.relpath(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
