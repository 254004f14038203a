"""``python -m benchmarks.gpu_check [--dry-run] [--skip-build] [--families F,G] [--total-s N] OUT``.

On a GPU machine with torch preinstalled (the lent H100/H200: torch 2.11 cu130, triton 3.6, 16 cores, no package
index), the plan of plan.py in at most 540 s; ``--dry-run`` runs the same phases on the CPU. Everything lands in
OUT (argument, else $GPU_CHECK_OUT), at most 8 files: gpu-check.json and .md (rewritten after every step),
gpu-check.log (build, tests, benchmarks), sanitizer.log, bench.json, bench.md, bench.png. Exit 0 when every family
passes, 1 when one fails (the summary's last lines give the targeted second command), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import subprocess
import sys
import time

from benchmarks.gpu_check import lent_image, phases, plan
from benchmarks.gpu_check.summary import Summary

MAX_FILES = 8  # what one device call brings back
OUTPUT_FILES = ("gpu-check.json", "gpu-check.md", "gpu-check.log", "sanitizer.log", "bench.json", "bench.md",
                "bench.png")


def publish(fetched: str) -> str:
    """Copy a GPU run's files (a fetched OUT) into benchmarks/results/gpu/<YYYYMMDD>-<commit>/, to be committed;
    benchmarks.report reads bench.json there. Refuses a dry run's files and an existing folder (never overwritten)."""
    import json
    import shutil

    with open(os.path.join(fetched, "gpu-check.json")) as f:
        data = json.load(f)
    if data.get("mode") != "gpu":
        raise ValueError(f"{fetched}: a {data.get('mode')} summary, not a GPU run's")
    dest = os.path.join(plan.RESULTS_GPU, f"{data['date'][:10].replace('-', '')}-{data['commit']}")
    if os.path.exists(dest):
        raise FileExistsError(f"{dest} exists already: not overwritten")
    os.makedirs(dest)
    for name in OUTPUT_FILES:
        if os.path.exists(os.path.join(fetched, name)):
            shutil.copyfile(os.path.join(fetched, name), os.path.join(dest, name))
    return dest


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=plan.ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "nocommit"


def retry_command(failed: list[str], out: str) -> str:
    """The second, targeted run: the failed families only, the build kept, within RETRY_TOTAL_S."""
    return (f"python -m benchmarks.gpu_check --skip-build --families {','.join(failed)} "
            f"--total-s {plan.RETRY_TOTAL_S} {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=os.environ.get("GPU_CHECK_OUT"),
                        help="output folder (default $GPU_CHECK_OUT)")
    parser.add_argument("--dry-run", action="store_true", help="every phase on the CPU, nothing on a GPU")
    parser.add_argument("--skip-build", action="store_true", help="use the extension as it is")
    parser.add_argument("--families", help=f"comma-separated, of: {', '.join(plan.FAMILIES)} (default all)")
    parser.add_argument("--total-s", type=float, help="scale the phase limits down to this many seconds")
    parser.add_argument("--publish", metavar="FETCHED", help="copy a GPU run's files into benchmarks/results/gpu/"
                        "<date>-<commit>/ (to commit) and stop")
    args = parser.parse_args(argv)
    if args.publish:
        try:
            print(f"gpu-check: copied into {publish(args.publish)}")
        except (OSError, ValueError, KeyError) as error:
            print(f"gpu-check: --publish: {error}", file=sys.stderr)
            return 1
        return 0
    if not args.out:
        parser.error("give the output folder: OUT, or GPU_CHECK_OUT (on a lent machine: its $OUT)")
    families = args.families.split(",") if args.families else list(plan.FAMILIES)
    unknown = [f for f in families if f not in plan.FAMILIES]
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)}; expected some of {', '.join(plan.FAMILIES)}")
    if args.total_s is not None and args.total_s <= 0:
        parser.error(f"--total-s must be > 0, got {args.total_s}")

    if args.dry_run:  # this process too imports only what the lent image has; each phase's processes do the same
        lent_image.install()
    import torch

    mode = "dry-run" if args.dry_run else "gpu"
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no GPU here (torch.cuda.is_available() is False): nothing to check; "
              "`make gpu-check-dry` runs the plan on the CPU")
        return 0
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    arch = ""
    if not args.dry_run:
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}" + ("a" if major == 9 else "")
    limits = plan.phase_limits(args.total_s, args.skip_build)
    counts, source = plan.compile_counts()
    chosen = plan.steps(families)
    slots = 1 if args.dry_run else max(2, os.cpu_count() or 2)
    os.makedirs(args.out, exist_ok=True)
    header = {
        "device": "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton_version, "python": platform.python_version(), "commit": _commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "plan": {"families": families, "phase_limits": {k: round(v) for k, v in limits.items()},
                 "sanitizer_tools": ["dry-run"] if args.dry_run else list(plan.SANITIZER_TOOLS),
                 "sanitizer_filter": plan.sanitizer_filter()[1::2], "slots": slots,
                 "compile_counts": {s.name: counts.get(s.name, 0) for s in chosen}, "compile_counts_from": source,
                 "estimated_s": plan.estimates(chosen, counts),
                 "predicted_tests_s": round(plan.makespan(chosen, counts, plan.LENT_CORES if args.dry_run else slots))},
    }
    summary = Summary(args.out, mode, header)
    ctx = phases.Context(mode, args.out, os.path.join(plan.ROOT, "build", "gpu-check", mode), families, slots, arch)
    for name in ("gpu-check.log", "sanitizer.log"):
        open(os.path.join(args.out, name), "w").close()
    print(f"gpu-check ({mode}): {header['device']}, phases {header['plan']['phase_limits']}, results in {args.out}",
          flush=True)
    tools_ok = phases.check_tools(ctx, summary)
    order = [(name, run) for name, run in (("build", phases.build), ("tests", phases.tests),
                                           ("sanitizer", phases.sanitizer), ("bench", phases.bench)) if name in limits]
    if args.dry_run:
        # On the CPU no phase waits on another (nothing is built, no GPU is shared): the phases run side by side,
        # each timed on its own.
        with concurrent.futures.ThreadPoolExecutor(len(order)) as pool:
            for future in [pool.submit(run, ctx, summary, limits[name]) for name, run in order]:
                future.result()
    else:
        for name, run in order:
            run(ctx, summary, limits[name])
    failed = summary.failed_families()
    if failed:
        summary.data["retry"] = retry_command(failed, "$OUT")
    summary.save()
    for family, verdict in summary.data["families"].items():
        print(f"gpu-check: {family:18s} {verdict}")
    for name, p in summary.data["phases"].items():
        print(f"gpu-check: phase {name:10s} {p.get('status')} in {p.get('s', 0):.0f} s (limit {p.get('limit_s')} s)")
    build_ok = summary.data["phases"].get("build", {}).get("status", "pass") == "pass"
    bench_ok = summary.data["phases"].get("bench", {}).get("status") in ("pass", "skipped")
    print(f"gpu-check: {'PASS' if not failed and tools_ok and build_ok and bench_ok else 'FAIL'} "
          f"in {summary.data['wall_s']:.0f} s; results in {args.out}" + (f"; then: {summary.data['retry']}"
                                                                        if failed else ""))
    files = os.listdir(args.out)
    if len(files) > MAX_FILES:
        print(f"gpu-check: warning: {len(files)} files in {args.out}, more than the {MAX_FILES} a device run returns")
    return 0 if not failed and tools_ok and build_ok and bench_ok else 1


if __name__ == "__main__":
    sys.exit(main())
