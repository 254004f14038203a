"""The compile gate: `python -m benchmarks.compile` (part of `make test`).

Compiles every Triton kernel of genfast/kernels (every config its autotuner or launch heuristic can pick, for
representative dtypes and shapes) and every csrc/cuda/*.cu for sm_90a and sm_80, without a GPU; writes
benchmarks/results/compile-sm<arch>-triton<version>.{json,md}; exits 1 when a config does not compile, needs
more shared memory than the architecture has, spills registers, or (sm_90a) an attention / conv_transpose
dot does not lower to wgmma. ``--triton-path DIR`` runs the Triton part again under the triton installed in
DIR (``pip install --target DIR triton==3.6.0 --no-deps``), in a subprocess.

For kernel owners: ``python -m benchmarks.compile --family attention --no-write`` compiles one family.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.compile import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCHS = ("90a", "80")

_WORK: list = []  # (arch, launch) of the Triton builds; the forked workers index it


def _build_one(index: int, cache_dir: str | None) -> dict:
    from benchmarks.compile import triton_build

    arch, launch = _WORK[index]
    return triton_build.build(launch, arch, cache_dir)


def _uncovered(modules: dict, launched: set) -> list[tuple[str, str]]:
    """(module, kernel) of every ``*_kernel`` Triton function in genfast/kernels that no case launched."""
    from triton.runtime.jit import JITFunction

    missing = []
    for short, module in modules.items():
        for value in vars(module).values():
            fn = value
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):  # autotune / heuristics wrappers
                fn = fn.fn
            if (isinstance(fn, JITFunction) and fn.__module__ == module.__name__ and fn.__name__.endswith("kernel")
                    and fn.__name__ not in launched):
                missing.append((short, fn.__name__))
    return sorted(set(missing))


def triton_rows(archs, families, jobs: int, cache_dir: str | None) -> dict[str, list[dict]]:
    """Rows of the Triton kernels per arch, under the triton this process imports."""
    from benchmarks.compile import capture, cases, triton_build
    from benchmarks.compile.fake_cuda import cuda_on_meta

    modules = cases.kernel_modules()
    selected = [c for c in cases.cases() if families is None or c.family in families]
    rows: dict[str, list] = {arch: [] for arch in archs}
    pending = []  # (arch, family, config text, index into _WORK)
    _WORK.clear()
    # A kernel is covered when some arch launches it (a Hopper-only kernel never runs on sm_80): the cases run for
    # every arch, the ones not gated only to see what they launch.
    launched = set()
    for arch in ARCHS:
        gated = arch in archs
        seen = set()
        swept: dict[str, set] = {}  # sweep group -> (kernel, config) built for it

        for case in selected:
            def pick(kernel, configs, group=case.sweep):
                if group is None:
                    return configs[:1]
                done = swept.setdefault(group, set())
                fresh = [c for c in configs if (kernel, str(c)) not in done]
                done.update((kernel, str(c)) for c in fresh)
                return fresh

            try:
                with cuda_on_meta(arch), capture.recording(pick) as launches:
                    case.run(modules)
            except Exception as error:  # a launcher changed under the case: the gate must say so, not pass
                if not gated:
                    continue
                rows[arch].append(report.row(case.family, "(launcher call)", "triton", case.name, {
                    "compiled": False, "error": f"the case could not call its launcher: {type(error).__name__}: "
                                                f"{error}".splitlines()[0][:300]}))
                continue
            for launch in launches:
                launched.add(launch.kernel)
                if not gated:
                    continue
                try:
                    key = triton_build.cache_key(launch, arch)
                except Exception:  # reported by the build, which fails the same way
                    key = (launch.kernel, len(pending))
                if key in seen:
                    continue
                seen.add(key)
                _WORK.append((arch, launch))
                config = f"{case.name}: {launch.config_text()}".rstrip(": ")
                pending.append((arch, case.family, launch.kernel, config, len(_WORK) - 1))
    for short, kernel in _uncovered(modules, launched) if families is None else []:
        for arch in archs:
            rows[arch].append(report.row(short, kernel, "triton", "-", {
                "compiled": False, "error": "no case of benchmarks/compile/cases.py launches this kernel"}))
    # Longest first (attention), so the pool's workers finish together.
    order = sorted(pending, key=lambda p: (not p[1].startswith("attention"), p[4]))
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(_build_one, p[4], cache_dir): p for p in order}
        done = {}
        for future in concurrent.futures.as_completed(futures):
            done[futures[future][4]] = future.result()
    for arch, family, kernel, config, index in pending:
        rows[arch].append(report.row(family, kernel, "triton", config, done[index]))
    _print_compile_times(pending, done)
    return rows


def _print_compile_times(pending, done) -> None:
    """Compiler seconds in all and the slowest compiles (as first compiled: a cached result keeps its time), so
    the gate's cost on CI's 2 cores can be watched and kept within its budget."""
    import triton

    timed = sorted(((done[p[4]].get("seconds") or 0.0, p) for p in pending), key=lambda t: -t[0])
    per_arch = ", ".join(f"sm_{arch} {sum(t[0] for t in timed if t[1][0] == arch):.0f} s"
                         for arch in dict.fromkeys(p[0] for p in pending))
    slowest = "; ".join(f"sm_{p[0]} {p[2]} [{p[3]}] {seconds:.0f} s" for seconds, p in timed[:3])
    print(f"compile gate: triton {triton.__version__}: {len(pending)} compiles, "
          f"{sum(t[0] for t in timed):.0f} s of compiler time ({per_arch}); slowest: {slowest}", flush=True)


def cuda_rows(archs, families, jobs: int) -> tuple[str | None, dict[str, list[dict]]]:
    """(nvcc version, rows per arch) of every csrc/cuda kernel; (None, empty rows) where there is no nvcc."""
    from benchmarks.compile import cuda_build

    nvcc = cuda_build.find_nvcc()
    if nvcc is None:
        print("compile gate: no nvcc here, CUDA sources skipped")
        return None, {arch: [] for arch in archs}
    tasks = [(src, arch) for src in cuda_build.sources() for arch in archs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        built = list(pool.map(lambda t: cuda_build.build(t[0], t[1], nvcc), tasks))
    rows: dict[str, list] = {arch: [] for arch in archs}
    for (_, arch), found in zip(tasks, built):
        for r in found:
            if families is None or r["family"] in families:
                rows[arch].append(report.row(r["family"], r["kernel"], "cuda", r["config"], r["measured"]))
    return cuda_build.nvcc_version(nvcc), rows


def _other_triton(path: str, args) -> tuple[str, dict[str, list[dict]]]:
    """Run the Triton part under the triton installed in ``path`` (a subprocess with it first on PYTHONPATH)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(path), ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        cmd = [sys.executable, "-m", "benchmarks.compile", "--triton-only", out.name, "--jobs", str(args.jobs)]
        cmd += [x for arch in args.arch for x in ("--arch", arch)]
        cmd += [x for family in (args.family or []) for x in ("--family", family)]
        if args.cache:
            cmd += ["--cache", args.cache]
        done = subprocess.run(cmd, cwd=ROOT, env=env)
        if done.returncode != 0:
            raise SystemExit(f"compile gate: the run under {path} failed (exit {done.returncode})")
        with open(out.name) as f:
            result = json.load(f)
    return result["triton"], result["rows"]


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "nocommit"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", choices=ARCHS, help="gate this arch only (repeatable)")
    parser.add_argument("--family", action="append", help="only this family (repeatable); writes no report")
    parser.add_argument("--triton-path", action="append", default=[],
                        help="also run under the triton installed in this folder (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--cache", default=os.path.join(ROOT, "build", "compile-gate"),
                        help="folder of cached results per Triton compile ('' for none)")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--no-write", action="store_true", help="check only; write no report")
    parser.add_argument("--no-cuda", action="store_true", help="skip the csrc/cuda sources")
    parser.add_argument("--no-triton", action="store_true",
                        help="compile only the csrc/cuda sources (what `make test` runs; seconds, not minutes)")
    parser.add_argument("--triton-only", metavar="JSON", help=argparse.SUPPRESS)  # the --triton-path subprocess
    args = parser.parse_args(argv)
    args.arch = args.arch or list(ARCHS)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile gate: TRITON_INTERPRET=1 is set; the gate compiles for real, so it is ignored here")
        os.environ.pop("TRITON_INTERPRET")
    import triton

    cache = os.path.join(args.cache, f"triton-{triton.__version__}") if args.cache else None
    start = time.time()
    if args.triton_only:
        rows = triton_rows(args.arch, args.family, args.jobs, cache)
        with open(args.triton_only, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f)
        print(f"compile gate: triton {triton.__version__}: {sum(map(len, rows.values()))} rows "
              f"in {time.time() - start:.0f} s", flush=True)
        return 0

    if args.no_triton:  # the CUDA rows alone: a partial check, so it writes no report
        args.no_write, args.triton_path = True, []
        by_version = {triton.__version__: {arch: [] for arch in args.arch}}
    else:
        by_version = {triton.__version__: triton_rows(args.arch, args.family, args.jobs, cache)}
    print(f"compile gate: triton {triton.__version__}: {sum(map(len, by_version[triton.__version__].values()))} "
          f"rows in {time.time() - start:.0f} s", flush=True)
    for path in args.triton_path:
        version, rows = _other_triton(path, args)
        by_version[version] = rows
    cuda_start = time.time()
    nvcc, cuda = (None, {a: [] for a in args.arch}) if args.no_cuda else cuda_rows(args.arch, args.family, args.jobs)
    if nvcc is not None:
        print(f"compile gate: nvcc {nvcc}: {sum(map(len, cuda.values()))} rows in {time.time() - cuda_start:.0f} s",
              flush=True)

    meta = {"nvcc": nvcc, "commit": _git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    messages = []
    for version, rows in by_version.items():
        for arch in args.arch:
            all_rows = rows[arch] + cuda[arch]
            fails = report.failures(all_rows, arch)
            # The CUDA rows do not depend on Triton: name their failures once.
            messages += [f"triton {version} {m}" if " triton " in m else m for m in fails
                         if " cuda " not in m or version == triton.__version__]
            if not args.no_write and args.family is None and nvcc is not None:  # complete reports only
                stem = report.write(args.results, {**meta, "arch": arch, "triton": version}, all_rows)
                print(f"compile gate: {os.path.relpath(stem, ROOT)}.json: {len(all_rows)} rows, {len(fails)} failing")
    if nvcc is None and not args.no_write:
        print("compile gate: no report written: without nvcc its CUDA rows would be missing")
    print(f"compile gate: {time.time() - start:.0f} s in all")
    if messages:
        print(f"compile gate: FAILED, {len(messages)} check(s):")
        for m in messages:
            print(f"  {m}")
        return 1
    print("compile gate: every kernel compiles, fits and spills nothing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
