"""Readable reports of a benchmark results file: a summary, one table and one figure per family.

``python -m benchmarks.report [RESULTS.json ...]`` (default: the latest results file committed in
benchmarks/results/, with every run there of the same device and commit) rewrites each file's ``<stem>.md`` (a
summary on top: per family, genfast's geometric-mean speedup over each peer and every case where genfast is slower
than a peer; then one table per family) and writes ``<stem>-<family>.png`` per family. ``--readme`` also rewrites
the README's headline table, the block between ``<!-- bench-table:start -->`` and ``<!-- bench-table:end -->``,
from that summary (of the per-row median of the files, given several).

Speedups are ratios of median times of rows of the same file: ``peer ms / genfast ms`` (above 1: genfast is
faster). genfast's row is the default call (``genfast-auto``) where the case has one, else each genfast backend.

The "replaced" rows (``harness.ReplacedCase``, the file's ``"replaced"`` list) get their own table: genfast's
default call against exactly what a user had before the swap, the median of ratios from alternating repetitions,
each row below ``1 - LOSS_MARGIN`` flagged as a loss. Given several results files of one device (``python -m
benchmarks.report A.json B.json --readme``), ``combine`` takes the per-row median of them: a replaced row below
the margin in every run is a loss, below it in only some is named as noise.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import statistics
import textwrap
from collections import defaultdict

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
README = os.path.join(os.path.dirname(RESULTS_DIR), "..", "README.md")
README_START, README_END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"
OWN_PREFIX = "genfast-"
DEFAULT_PROVIDER = "genfast-auto"
# The one loss margin: a "replaced" row below 1 - LOSS_MARGIN (0.97x) is flagged as a loss, and the README lists
# one by one the comparisons slower than a peer by more than it (closer than that is this machine's noise).
LOSS_MARGIN = 0.03


def load(path: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    for key in ("device", "commit", "date", "results"):
        if key not in data:
            raise ValueError(f"{path}: not a benchmark results file (no {key!r})")
    return data


def latest_results(results_dir: str = RESULTS_DIR) -> str:
    """The results file with the latest date in ``results_dir`` or in a GPU run's folder under it
    (``gpu/<date>-<commit>/``, from `make gpu-check`); compile reports and gpu-check's own summary are not benchmark
    results, and older runs live in ``results_dir/history/``, not searched."""
    # A `--replaced` run times no cases: it cannot stand for the suite.
    found = glob.glob(os.path.join(results_dir, "*.json")) + glob.glob(os.path.join(results_dir, "gpu", "*", "*.json"))
    paths = [p for p in found if not os.path.basename(p).startswith(("compile-", "gpu-check")) and load(p)["results"]]
    if not paths:
        raise FileNotFoundError(f"no benchmark results in {results_dir}")
    return max(paths, key=lambda p: (load(p)["date"], p))


def current_runs(results_dir: str = RESULTS_DIR) -> list[str]:
    """The latest results file and every other one at the top level of ``results_dir`` of the same device and
    commit, oldest first: the set of runs the README's headline is the per-row median of (issue 26 commits two)."""
    latest = load(latest_results(results_dir))

    def same_suite(path: str) -> bool:
        data = load(path)
        return bool(data["results"]) and (data["device"], data["commit"]) == (latest["device"], latest["commit"])

    found = [p for p in glob.glob(os.path.join(results_dir, "*.json"))
             if not os.path.basename(p).startswith(("compile-", "gpu-check")) and same_suite(p)]
    return sorted(found, key=lambda p: (load(p)["date"], p))


def combine(runs: list[dict]) -> dict:
    """One results dict from several runs of one suite: the first run's header, every timed row's median ``ms``
    over the runs that have it, every replaced row's median ratio, with ``run_ratios`` and ``below`` (in how many
    of its ``runs`` it fell under ``1 - LOSS_MARGIN``)."""
    timed: dict[tuple, list[dict]] = defaultdict(list)
    swapped: dict[tuple, list[dict]] = defaultdict(list)
    for data in runs:
        for r in data["results"]:
            timed[(r["family"], r["op"], r["case"], r["provider"])].append(r)
        for r in data.get("replaced", []):
            swapped[(r["family"], r["drop_in"], r["case"], r["before"])].append(r)
    results = []
    for rows in timed.values():
        row = dict(rows[0])
        for key in ("ms", "ms_p20", "ms_p80"):
            row[key] = statistics.median(r[key] for r in rows)
        results.append(row)
    replaced = []
    for rows in swapped.values():
        row = dict(rows[0])
        for key in ("ratio", "ratio_p20", "ratio_p80", "genfast_ms", "before_ms"):
            row[key] = statistics.median(r[key] for r in rows)
        row["run_ratios"] = [r["ratio"] for r in rows]
        row["runs"] = len(rows)
        row["below"] = sum(r["ratio"] < 1.0 - LOSS_MARGIN for r in rows)
        replaced.append(row)
    out = {**runs[0], "results": results, "replaced": replaced}
    if len(runs) > 1:
        out["combined_from"] = [f"{d['commit']} {d['date']}" for d in runs]
    return out


def replaced_verdict(row: dict) -> str:
    """'loss' when the row is below the margin in every run it has, 'noise (...)' in only some, else ''."""
    runs = row.get("runs", 1)
    below = row.get("below", int(row["ratio"] < 1.0 - LOSS_MARGIN))
    if below and below == runs:
        return "**loss**"
    return f"noise (below in {below} of {runs} runs)" if below else ""


def replaced_markdown(data: dict, heading: str = "## ") -> list[str]:
    """The "replaced" table: every drop-in against what it replaces, losses flagged."""
    rows = data.get("replaced", [])
    if not rows:
        return []
    reps = min(r["reps"] for r in rows)
    lines = [f"{heading}Replaced: genfast's default call against what it replaces", "",
             f"Each row alternates the two calls every repetition ({reps} or more), so that machine noise hits both; "
             "the ratio is the median of `before ms / genfast ms` (above 1x genfast is faster; p20–p80 beside it). "
             f"A row below {1 - LOSS_MARGIN:.2f}x is flagged as a loss.", "",
             "| family | drop-in | case | replaces | genfast ms | before ms | ratio | p20–p80 | flag |",
             "|---|---|---|---|---:|---:|---:|---|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["drop_in"], r["case"])):
        runs = f" (runs: {', '.join(_x(v) for v in r['run_ratios'])})" if len(r.get("run_ratios", [])) > 1 else ""
        lines.append(f"| {r['family']} | `{r['drop_in']}` | {r['case']} | `{r['before']}` | {r['genfast_ms']:.4f} | "
                     f"{r['before_ms']:.4f} | {_x(r['ratio'])}{runs} | {_x(r['ratio_p20'])}–{_x(r['ratio_p80'])} | "
                     f"{replaced_verdict(r)} |")
    return lines + [""]


def comparisons(results: list[dict]) -> list[dict]:
    """One entry per (op, case, genfast provider, peer): the speedup ``peer ms / genfast ms``."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["family"], r["op"], r["case"])].append(r)
    out = []
    for (family, op, case), rows in groups.items():
        own = [r for r in rows if r["provider"].startswith(OWN_PREFIX)]
        default = [r for r in own if r["provider"] == DEFAULT_PROVIDER]
        peers = [r for r in rows if not r["provider"].startswith(OWN_PREFIX)]
        for mine in default or own:
            for peer in peers:
                if mine["ms"] > 0 and peer["ms"] > 0:
                    out.append({"family": family, "op": op, "case": case, "genfast": mine["provider"],
                                "peer": peer["provider"], "speedup": peer["ms"] / mine["ms"]})
    return out


def summary(comps: list[dict]) -> list[dict]:
    """Per (family, genfast provider, peer): cases, geometric-mean, min and max speedup."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for c in comps:
        groups[(c["family"], c["genfast"], c["peer"])].append(c["speedup"])
    out = []
    for (family, mine, peer), values in sorted(groups.items()):
        out.append({"family": family, "genfast": mine, "peer": peer, "cases": len(values),
                    "geomean": math.exp(sum(map(math.log, values)) / len(values)),
                    "min": min(values), "max": max(values)})
    return out


def losses(comps: list[dict], margin: float = 0.0) -> list[dict]:
    """Every comparison where genfast is slower than the peer (by more than ``margin``), slowest first."""
    return sorted((c for c in comps if c["speedup"] < 1.0 - margin), key=lambda c: c["speedup"])


def _x(value: float) -> str:
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def _short(provider: str) -> str:
    return provider[len(OWN_PREFIX):] if provider.startswith(OWN_PREFIX) else provider


def summary_markdown(data: dict, comps: list[dict]) -> list[str]:
    lines = ["## Summary", "",
             "genfast's speedup over each peer (`peer time / genfast time`; above 1x genfast is faster), per family:",
             "", "| family | genfast | vs | cases | geometric mean | min | max |", "|---|---|---|---:|---:|---:|---:|"]
    for s in summary(comps):
        lines.append(f"| {s['family']} | {_short(s['genfast'])} | {s['peer']} | {s['cases']} | {_x(s['geomean'])} | "
                     f"{_x(s['min'])} | {_x(s['max'])} |")
    lost = losses(comps)
    lines += ["", f"### Losses: {len(lost)} comparison(s) where genfast is slower than a peer", ""]
    lines += [f"- {c['family']} `{c['op']}` [{c['case']}]: {_short(c['genfast'])} at {_x(c['speedup'])} of "
              f"{c['peer']}" for c in lost] or ["None."]
    return lines + [""]


def markdown(data: dict, figure_names: dict | None = None) -> str:
    """The report: the summary, then per family its figure and its table. ``figure_names``: family -> image
    file (default ``<stem>-<family>.png`` beside the results file)."""
    results = data["results"]
    comps = comparisons(results)
    ceilings = data.get("ceilings", {})
    stem = stem_name(data)
    lines = [f"# genfast benchmarks: {data['device']}", "",
             f"torch {data.get('torch')}, triton {data.get('triton')}, CUDA {data.get('cuda')}, "
             f"commit {data['commit']}, {data['date']}"
             + (f", the whole run took {data['duration_s'] / 60:.0f} min" if data.get("duration_s") else ""), "",
             "Ceilings measured in this run: " + ", ".join(f"{k} = {v}" for k, v in ceilings.items()), ""]
    lines += summary_markdown(data, comps)
    lines += replaced_markdown(data)
    copy = ceilings.get("copy_GBps")
    # Compute-bound cases read against this run's own matmul (bf16 on a GPU, fp32 on a CPU), as they do copy.
    matmul = ceilings.get("bf16_matmul_TFLOPs") or ceilings.get("fp32_matmul_TFLOPs")
    fmt = lambda v: "" if v is None else f"{v}"  # noqa: E731
    for family in sorted({r["family"] for r in results}):
        image = (figure_names or {}).get(family) or f"{stem}-{family}.png"
        lines += [f"## {family}", "", f"![{family}]({image})" if _has_figure(comps, family)
                  else "(no genfast provider ran on this device: nothing to compare)", "",
                  "| op | case | provider | ms (median) | speedup of genfast | GB/s | % copy | TFLOP/s | % matmul |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        speed = {(c["op"], c["case"], c["peer"]): c["speedup"] for c in comps if c["family"] == family}
        for r in (r for r in results if r["family"] == family):
            frac = f"{100 * r['GBps'] / copy:.0f}%" if r.get("GBps") and copy else ""
            of_matmul = f"{100 * r['TFLOPs'] / matmul:.0f}%" if r.get("TFLOPs") and matmul else ""
            mine = speed.get((r["op"], r["case"], r["provider"]))
            lines.append(f"| {r['op']} | {r['case']} | {r['provider']} | {r['ms']:.4f} | "
                         f"{_x(mine) if mine else ''} | {fmt(r.get('GBps'))} | {frac} | {fmt(r.get('TFLOPs'))} | "
                         f"{of_matmul} |")
        lines.append("")
    return "\n".join(lines)


def _has_figure(comps: list[dict], family: str) -> bool:
    return any(c["family"] == family for c in comps)


def stem_name(data: dict) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", data["device"].lower()).strip("-")
    return f"{slug}-{data['date'][:10].replace('-', '')}-{data['commit']}"


def _ticks(limit: float) -> list[float]:
    """Tick values symmetric about 1x (0.5x and 2x, 0.1x and 10x, ...) inside [1/limit, limit]."""
    if limit <= 2.5:
        ups = [1.25, 1.5, 2]
    elif limit <= 6:
        ups = [1.5, 2, 3, 5]
    else:
        ups = [2, 10, 100, 1000]
    ups = [v for v in ups if v <= limit * 1.001]
    return sorted([1 / v for v in ups] + [1.0] + ups)


def figure(data: dict, families: list[str], path: str) -> bool:
    """Speedup bars of genfast over each peer, one panel per family with comparisons, bars drawn from 1x on a
    log axis centred at 1x. Returns False (and writes nothing) when none of ``families`` has a comparison."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    comps = [c for c in comparisons(data["results"]) if c["family"] in families]
    shown = [f for f in families if _has_figure(comps, f)]
    if not shown:
        return False
    peers = sorted({c["peer"] for c in comps})
    colours = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(peers)}
    labels_of = {f: list(dict.fromkeys(f"{c['op']} [{c['case']}]" for c in comps if c["family"] == f)) for f in shown}
    wrap = 44
    bars = {f: sum(1 for c in comps if c["family"] == f) for f in shown}
    heights = [0.8 + 0.16 * bars[f] + 0.12 * len(labels_of[f]) for f in shown]
    fig, axes = plt.subplots(len(shown), 1, figsize=(11, sum(heights) + 1.2), squeeze=False,
                             gridspec_kw={"height_ratios": heights}, layout="constrained")
    extreme = max(max(c["speedup"], 1 / c["speedup"]) for c in comps)
    limit = 10 ** (math.ceil(math.log10(extreme) * 4 + 0.5) / 4)  # symmetric about 1x, with room for labels
    for ax, family in zip(axes[:, 0], shown):
        labels = labels_of[family]
        y, ticks = 0.0, []
        for label in labels:
            rows = [c for c in comps if c["family"] == family and f"{c['op']} [{c['case']}]" == label]
            start = y
            for c in rows:
                ax.barh(y, c["speedup"] - 1.0, left=1.0, height=0.8, color=colours[c["peer"]],
                        label=c["peer"])
                right = c["speedup"] >= 1.0
                ax.text(c["speedup"] * (1.04 if right else 1 / 1.04), y, _x(c["speedup"]), va="center",
                        ha="left" if right else "right", fontsize=7)
                y += 1
            ticks.append(((start + y - 1) / 2, "\n".join(textwrap.wrap(label, wrap))))
            y += 0.6
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(1 / limit, limit)
        ax.xaxis.set_major_locator(ticker.FixedLocator(_ticks(limit)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.2g}x"))
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_ylim(y - 0.4, -0.8)
        ax.set_yticks([t for t, _ in ticks], [lb for _, lb in ticks], fontsize=7)
        ax.set_title(f"{family}: genfast ({_short(rows[0]['genfast'])}) vs each peer", fontsize=9, loc="left")
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
        ax.grid(axis="x", which="both", alpha=0.25)
    axes[-1, 0].set_xlabel("speedup of genfast (peer time / genfast time, log scale; right of 1x: genfast is faster)")
    fig.suptitle(f"genfast on {data['device']} (commit {data['commit']}, {data['date'][:10]})", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write(path: str, one_figure: bool = False) -> list[str]:
    """Rewrite ``<stem>.md`` of results file ``path`` and write one figure per family (``<stem>-<family>.png``),
    or one figure with a panel per family (``<stem>.png``); the files written."""
    data = load(path)
    stem = os.path.splitext(os.path.abspath(path))[0]
    families = sorted({r["family"] for r in data["results"]})
    written = [stem + ".md"]
    with open(stem + ".md", "w") as f:
        base = os.path.basename(stem)
        f.write(markdown(data, {f: f"{base}.png" if one_figure else f"{base}-{f}.png" for f in families}))
    if one_figure:
        if figure(data, families, stem + ".png"):
            written.append(stem + ".png")
        return written
    for family in families:
        if figure(data, [family], f"{stem}-{family}.png"):
            written.append(f"{stem}-{family}.png")
    return written


def readme_block(data: dict, results_name: str) -> str:
    """The README's headline table: the summary per family and peer, and the losses beyond the margin."""
    comps = comparisons(data["results"])
    lines = [README_START,
             f"<!-- generated by `python -m benchmarks.report --readme` from {results_name}; do not edit -->",
             f"Measured on {data['device']}, commit {data['commit']}, {data['date'][:10]} (`{results_name}`"
             + (f"; the whole `make bench` run took {data['duration_s'] / 60:.0f} min" if data.get("duration_s")
                else "; that run predates the record of the suite's duration")
             + "): genfast's default call (`auto`, or where a benchmark names backends, the one auto takes on this "
             "device) and its fast options (each named in the genfast column) against each peer, the geometric mean of "
             "`peer time / genfast time` over the family's cases (above 1x genfast is faster), with the range.", "",
             "| family | genfast | vs | cases | geometric mean | range |", "|---|---|---|---:|---:|---|"]
    for s in summary(comps):
        lines.append(f"| {s['family']} | {_short(s['genfast'])} | {s['peer']} | {s['cases']} | {_x(s['geomean'])} | "
                     f"{_x(s['min'])} – {_x(s['max'])} |")
    big = losses(comps, LOSS_MARGIN)
    small = len(losses(comps)) - len(big)
    lines += ["", f"Losses, where genfast is more than {LOSS_MARGIN:.0%} slower than a peer ({len(big)}):", ""]
    lines += [f"- {c['family']} `{c['op']}` [{c['case']}]: {_short(c['genfast'])} at {_x(c['speedup'])} of {c['peer']}"
              for c in big] or ["- none"]
    lines += ["", f"and {small} more within {LOSS_MARGIN:.0%} (run-to-run noise on this machine); "
              "every case is in the results' `.md`."]
    if data.get("combined_from"):
        lines += ["", "Every time above is the per-row median of the runs " + ", ".join(data["combined_from"]) + "."]
    if data.get("replaced"):
        lines += [""] + replaced_markdown(data, heading="#### ")[:-1]
    lines.append(README_END)
    return "\n".join(lines)


def update_readme(data: dict, results_path: str, readme: str = README) -> None:
    with open(readme) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_START} ... {README_END} block to rewrite")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    name = os.path.relpath(os.path.abspath(results_path), os.path.dirname(os.path.abspath(readme)))
    with open(readme, "w") as f:
        f.write(head + readme_block(data, name) + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="*",
                        help="results .json file(s) (default: the latest in benchmarks/results/ and the runs there of "
                             "its device and commit); with several, --readme takes the per-row median of them")
    parser.add_argument("--readme", action="store_true", help="also rewrite the README's headline table")
    args = parser.parse_args(argv)
    paths = args.results or current_runs()
    for path in paths:
        for written in write(path):
            print(f"wrote {os.path.relpath(written)}")
    if args.readme:
        runs = [load(p) for p in paths]
        update_readme(combine(runs) if len(runs) > 1 else runs[0], paths[-1])
        print(f"rewrote the headline table of {os.path.relpath(README)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
