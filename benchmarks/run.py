"""Run the benchmark suite: `make bench` or `python -m benchmarks.run [--family F] [--quick]`.

Times every case of every benchmarks/bench_<family>.py on the device present (CUDA if available,
else the CPU), prints a table with ratios measured in this run, and writes
benchmarks/results/<device>-<date>-<commit>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
from collections import defaultdict

import torch

from benchmarks import harness

# Providers that are genfast's own; the others are the yardsticks it is compared against.
OWN_PREFIX = "genfast-"


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


def ratio_rows(results: list[dict]) -> list[dict]:
    """Per (op, case): each provider's time and its speedup over the reference and over the best peer."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in results:
        groups[(row["op"], row["case"])].append(row)
    table = []
    for (op, case), rows in groups.items():
        reference = next((r["ms"] for r in rows if r["provider"] == "reference"), None)
        peers = [r["ms"] for r in rows if not r["provider"].startswith(OWN_PREFIX) and r["provider"] != "reference"]
        best_peer = min(peers) if peers else None
        for r in rows:
            table.append({
                **r,
                "x_reference": round(reference / r["ms"], 2) if reference else None,
                "x_best_peer": round(best_peer / r["ms"], 2) if best_peer else None,
            })
    return table


def markdown(env: dict, ceilings: dict, table: list[dict]) -> str:
    lines = [
        f"# genfast benchmarks: {env['device']}",
        "",
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit {env['commit']}, {env['date']}",
        "",
        "Ceilings measured in this run: " + ", ".join(f"{k} = {v}" for k, v in ceilings.items()),
        "",
        "Speedups are ratios of median times from this run: `x ref` over the reference, `x peer` over the",
        "fastest non-genfast provider of the same case (higher is better).",
        "",
        "| op | case | provider | ms (median) | x ref | x peer | GB/s | % copy | TFLOP/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    copy = ceilings.get("copy_GBps")
    for r in table:
        frac = f"{100 * r['GBps'] / copy:.0f}%" if r["GBps"] and copy else ""
        fmt = lambda v: "" if v is None else f"{v}"  # noqa: E731
        lines.append(
            f"| {r['op']} | {r['case']} | {r['provider']} | {r['ms']:.4f} | {fmt(r['x_reference'])} | "
            f"{fmt(r['x_best_peer'])} | {fmt(r['GBps'])} | {frac} | {fmt(r['TFLOPs'])} |"
        )
    return "\n".join(lines) + "\n"


def chart(env: dict, table: list[dict], path: str) -> None:
    """One panel per family: horizontal bars of each provider's speedup over the reference, per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = sorted({r["family"] for r in table})
    providers = sorted({r["provider"] for r in table if r["provider"] != "reference"})
    colours = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    cases_of = {f: sorted({f"{r['op']}: {r['case']}" for r in table if r["family"] == f}) for f in families}
    heights = [max(1.2, 0.3 * len(cases_of[f]) * max(1, len(providers)) ** 0.5) for f in families]
    fig, axes = plt.subplots(len(families), 1, figsize=(11, sum(heights) + 1), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, family in zip(axes[:, 0], families):
        labels = cases_of[family]
        rows = [r for r in table if r["family"] == family and r["provider"] != "reference"]
        present = [p for p in providers if any(r["provider"] == p for r in rows)]
        width = 0.8 / max(1, len(present))
        for i, provider in enumerate(present):
            lookup = {f"{r['op']}: {r['case']}": r["x_reference"] for r in rows if r["provider"] == provider}
            ys = [j + i * width for j in range(len(labels))]
            ax.barh(ys, [lookup.get(label) or 0 for label in labels], width, label=provider, color=colours[provider])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_title(family, fontsize=9, loc="left")
        ax.legend(fontsize=6, loc="lower right")
    axes[-1, 0].set_xlabel("speedup over the reference (x, log scale; 1 = the reference)")
    fig.suptitle(f"genfast on {env['device']} ({env['commit']}, {env['date'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="append", help="only this family (repeatable): e.g. sampling")
    parser.add_argument("--quick", action="store_true", help="small cases and short timing, for a smoke run")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timing = {"min_time_s": 0.05, "max_reps": 20} if args.quick else {}
    env = harness.environment(device)
    cases = collect_cases(device, args.family, args.quick)
    if not cases:
        print("no benchmark cases selected", file=sys.stderr)
        return 1
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; stay usable without it all the same
        tqdm = lambda xs, **_: xs  # noqa: E731

    print(f"genfast benchmarks on {env['device']}: {len(cases)} timings", flush=True)
    ceilings = harness.ceilings(device)
    results = []
    for case in tqdm(cases, desc="benchmarks", unit="case"):
        try:
            results.append(harness.measure(case, device, **timing))
        except Exception as error:  # one failing provider must not lose the rest of the run
            print(f"\n{case.name}: FAILED ({type(error).__name__}: {error})", file=sys.stderr)
    table = ratio_rows(results)
    text = markdown(env, ceilings, table)
    print(text)
    if not args.no_write:
        os.makedirs(harness.RESULTS_DIR, exist_ok=True)
        stem = harness.result_stem(env)
        with open(stem + ".json", "w") as f:
            json.dump({**env, "ceilings": ceilings, "results": results}, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(text)
        chart(env, table, stem + ".png")
        print(f"wrote {stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
