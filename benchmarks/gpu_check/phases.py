"""The four phases of the plan (plan.py), each run for real on a GPU or dry on the CPU, and how their output is read.

Every phase takes a ``Context`` (mode, output folder, deadline) and records into the ``Summary`` as it goes. Every
process runs with its output in a file of the work folder (build/gpu-check/<mode>/), so a process killed at the
phase's deadline still leaves what it printed; a dry run starts each one through ``lent_image`` (the packages the
lent image lacks are hidden).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from benchmarks.gpu_check import plan
from benchmarks.gpu_check.summary import Summary
from benchmarks.gpu_check.workload import MARK


@dataclasses.dataclass
class Context:
    mode: str  # "gpu" or "dry-run"
    out: str
    work: str
    families: list[str]
    slots: int
    arch: str = ""

    @property
    def dry(self) -> bool:
        return self.mode == "dry-run"

    def python(self, module: str, *args: str) -> list[str]:
        """``python -m module args``; in a dry run through lent_image, which hides what the lent image lacks."""
        if self.dry:
            return [sys.executable, "-m", "benchmarks.gpu_check.lent_image", module, *args]
        return [sys.executable, "-m", module, *args]

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(PYTHONUNBUFFERED="1", **extra)
        return env


@dataclasses.dataclass
class Job:
    name: str
    cmd: list[str]
    env: dict
    log: str
    started: float = 0.0
    proc: subprocess.Popen | None = None


def run_jobs(jobs: list[Job], deadline: float, slots: int, done, lock=None) -> None:
    """Run ``jobs`` ``slots`` at a time, in the given order, each killed (with its children) at ``deadline``;
    ``done(job, exit code or None when killed, output, seconds)`` as each ends, holding ``lock`` if given (the
    summary's)."""
    if lock is not None:
        def done(job, code, output, seconds, _done=done):
            with lock:
                _done(job, code, output, seconds)

    waiting, running = list(jobs), []
    while waiting or running:
        while waiting and len(running) < slots and time.time() < deadline:
            job = waiting.pop(0)
            os.makedirs(os.path.dirname(job.log), exist_ok=True)
            with open(job.log, "w") as log:
                log.write(f"$ {' '.join(job.cmd)}\n")
                log.flush()
                job.proc = subprocess.Popen(job.cmd, cwd=plan.ROOT, env=job.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
            job.started = time.time()
            running.append(job)
        if not running:  # the deadline passed before these could start
            for job in waiting:
                done(job, None, "[not started: the phase's time ran out]\n", 0.0)
            return
        time.sleep(0.2)
        for job in list(running):
            code = job.proc.poll()
            if code is None and time.time() >= deadline:
                os.killpg(job.proc.pid, signal.SIGKILL)
                job.proc.wait()
            elif code is None:
                continue
            running.remove(job)
            with open(job.log, errors="replace") as f:
                output = f.read()
            killed = code is None
            if killed:
                output += f"\n[killed at the phase's deadline after {time.time() - job.started:.0f} s]\n"
            done(job, None if killed else code, output, time.time() - job.started)


def append_log(path: str, title: str, output: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        f.write(f"\n===== {title}\n{output}")


# ------------------------------------------------------------------------------------------------------- tools
def find_tool(name: str) -> str | None:
    """``name`` on the PATH, in /usr/local/cuda/bin, or (cuobjdump, ptxas) in the triton wheel."""
    found = shutil.which(name) or (f"/usr/local/cuda/bin/{name}" if os.path.exists(f"/usr/local/cuda/bin/{name}")
                                   else None)
    if found is None:
        try:
            import triton

            bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
            found = bundled if os.path.exists(bundled) else None
        except ImportError:
            pass
    return found


def check_tools(ctx: Context, summary: Summary) -> bool:
    """compute-sanitizer and cuobjdump (the compile gate's SASS reader) must be there on a GPU machine: a missing
    one is a failure of its own, named in the summary. A dry run records what this machine has."""
    ok = True
    for name in ("compute-sanitizer", "cuobjdump", "nvcc"):
        path = find_tool(name)
        required = name != "nvcc" and not ctx.dry
        summary.data["tools"][name] = path or ("MISSING" if required else "missing (not needed here)")
        ok = ok and (path is not None or not required)
    summary.save()
    return ok


# ------------------------------------------------------------------------------------------------------- build
def build(ctx: Context, summary: Summary, limit: float) -> None:
    """A GPU run builds the extension for this GPU's arch only, with every core; a dry run checks that genfast and
    its CLI load with what the lent image has (``genfast info``), and builds nothing."""
    start = time.time()
    if ctx.dry:
        cmd, env = ctx.python("genfast", "info"), ctx.env()
    else:
        cmd = [sys.executable, "-m", "pip", "install", "-e", ".", "--no-build-isolation", "--no-deps", "--quiet"]
        env = ctx.env(GENFAST_CUDA_ARCHS=ctx.arch, MAX_JOBS=str(os.cpu_count() or 4))
    results = {}

    def done(job, code, output, seconds):
        results["code"] = code
        append_log(os.path.join(ctx.out, "gpu-check.log"), f"build ({seconds:.0f} s, exit {code})", output)

    run_jobs([Job("build", cmd, env, os.path.join(ctx.work, "build.log"))], start + limit, 1, done, summary.lock)
    code = results.get("code")
    status = "pass" if code == 0 else "timeout" if code is None else "fail"
    summary.phase("build", status=status, s=round(time.time() - start, 1), limit_s=round(limit), arch=ctx.arch,
                  command=" ".join(cmd))
    print(f"gpu-check: build {status} ({time.time() - start:.0f} s)", flush=True)


# ------------------------------------------------------------------------------------------------------- tests
_VERBOSE = re.compile(r"^(\S+::\S.*?) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b", re.M)
_ERROR_LINE = re.compile(r"^ERROR (\S+)", re.M)


def pytest_outcome(code: int | None, output: str) -> dict:
    """A step's result from its ``-v`` output, line by line, so that a step killed at the deadline still counts
    what it ran: status "pass", "fail", "timeout", "no tests" (exit 5) or "error" (collection/usage)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for nodeid, word in _VERBOSE.findall(output):
        if word in ("PASSED", "XFAIL"):
            counts["passed"] += 1
        elif word == "SKIPPED":
            counts["skipped"] += 1
        else:
            counts["failed"] += 1
            failures.append(nodeid)
    failures += [n for n in _ERROR_LINE.findall(output) if n not in failures]
    if code is None:
        status = "timeout"
    elif code == 5:
        status = "no tests"
    elif code == 0:
        status = "pass"
    else:
        status = "fail" if counts["failed"] or failures else "error"
    return {"status": status, **counts, "failures": failures[:100]}


def count_compiles(cache_dir: str) -> int:
    """Kernel variants Triton compiled into ``cache_dir`` (one .cubin each)."""
    return sum(name.endswith(".cubin") for _, _, names in os.walk(cache_dir) for name in names)


def tests(ctx: Context, summary: Summary, limit: float) -> None:
    start = time.time()
    chosen = plan.steps(ctx.families)
    counts, source = plan.compile_counts()
    if ctx.dry:
        _collect(ctx, summary, chosen)
    else:
        _run_tests(ctx, summary, plan.order(chosen, counts), start + limit)
    summary.phase("tests", status="done", s=round(time.time() - start, 1), limit_s=round(limit))


def _run_tests(ctx: Context, summary: Summary, ordered: list[plan.Step], deadline: float) -> None:
    log = os.path.join(ctx.out, "gpu-check.log")
    # Warm-up first (short, and the later phases wait on it): compile what the sanitizer's workload (one process per
    # family, side by side) and the benchmarks launch into the cache those phases will read.
    shared = os.path.join(ctx.work, "triton", "shared")
    jobs = [Job(f"warm-workload-{family}", ctx.python("benchmarks.gpu_check.workload", "--device", "cuda",
                                                      "--families", family),
                ctx.env(TRITON_CACHE_DIR=shared), os.path.join(ctx.work, f"warm-workload-{family}.log"))
            for family in ctx.families]
    if any(f in ctx.families for f in plan.BENCH_FAMILIES):
        jobs.append(Job("warm-bench", ctx.python("benchmarks.run", *bench_args(ctx), "--no-write"),
                        ctx.env(TRITON_CACHE_DIR=shared), os.path.join(ctx.work, "warm-bench.log")))
    cached = {}  # the cubins each step's own cache held before: a rerun on the same machine reuses them
    for step in ordered:
        cache = os.path.join(ctx.work, "triton", step.name)
        cached[step.name] = count_compiles(cache)
        cmd = ctx.python("pytest", *step.pytest_args(), "-v", "-p", "no:cacheprovider", "-o", "addopts=", "-rfE")
        env = ctx.env(GENFAST_AUTOTUNE="1" if step.autotune else "0", TRITON_CACHE_DIR=cache)
        jobs.append(Job(step.name, cmd, env, os.path.join(ctx.work, f"test-{step.name}.log")))
    by_name = {s.name: s for s in ordered}

    def done(job, code, output, seconds):
        append_log(log, f"{job.name} ({seconds:.0f} s, exit {code})", output)
        step = by_name.get(job.name)
        if step is None:
            summary.data["phases"].setdefault("tests", {}).setdefault("warm", {})[job.name] = {
                "status": "pass" if code == 0 else "timeout" if code is None else "fail", "s": round(seconds, 1)}
        else:
            result = pytest_outcome(code, output)
            summary.data["tests"][step.name] = {"family": step.family, **result, "s": round(seconds, 1),
                                                # the variants the step needs (what a fresh machine compiles),
                                                # and those this run compiled (fewer on a rerun)
                                                "compiles": count_compiles(job.env["TRITON_CACHE_DIR"]),
                                                "compiled_now": count_compiles(job.env["TRITON_CACHE_DIR"]) -
                                                cached[step.name],
                                                "autotune": step.autotune, "command": " ".join(job.cmd[2:])}
            print(f"gpu-check: tests {step.name:28s} {result['status']:8s} {result['passed']} passed, "
                  f"{result['failed']} failed, {result['skipped']} skipped ({seconds:.0f} s)", flush=True)
        summary.save()

    run_jobs(jobs, deadline, ctx.slots, done, summary.lock)


def _collect(ctx: Context, summary: Summary, chosen: list[plan.Step]) -> None:
    """The dry run's tests phase: one collection of every step's files, each step's -k applied as pytest applies
    it, on a pretend GPU (collect.py)."""
    files = sorted({f for s in chosen for f in s.files})
    result_path = os.path.join(ctx.work, "collected.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    steps_json = json.dumps({s.name: [list(s.files), s.keyword] for s in chosen})
    cmd = ctx.python("pytest", "-p", "benchmarks.gpu_check.collect", "--collect-only", "-q", "-p", "no:cacheprovider",
                     "-o", "addopts=", *files)
    env = ctx.env(GPU_CHECK_STEPS=steps_json, GPU_CHECK_COLLECTED=result_path)
    outcome = {}

    def done(job, code, output, seconds):
        outcome.update(code=code, s=seconds)
        append_log(os.path.join(ctx.out, "gpu-check.log"), f"collection ({seconds:.0f} s, exit {code})",
                   output[-20000:])

    run_jobs([Job("collect", cmd, env, os.path.join(ctx.work, "collect.log"))], time.time() + 600, 1, done)
    try:
        with open(result_path) as f:
            collected = json.load(f)
    except (OSError, ValueError):
        collected = {"selected": {}, "errors": [{"nodeid": "", "error": f"collection exit {outcome.get('code')}"}]}
    with summary.lock:
        for step in chosen:
            errors = [e for e in collected["errors"] if not e["nodeid"] or e["nodeid"] in step.files]
            selected = collected["selected"].get(step.name, 0)
            status = "error" if errors else "collected" if selected else "no tests"
            summary.data["tests"][step.name] = {"family": step.family, "status": status, "selected": selected,
                                                "errors": [e["error"][-500:] for e in errors],
                                                "autotune": step.autotune, "s": round(outcome.get("s", 0.0), 1),
                                                "command": "pytest " + " ".join(step.pytest_args())}
            print(f"gpu-check: tests {step.name:28s} {status:9s} {selected} selected", flush=True)
        summary.save()


# --------------------------------------------------------------------------------------------------- sanitizer
# compute-sanitizer's report lines for an error (memcheck, racecheck); its closing "ERROR SUMMARY" line is not one.
_SANITIZER_ERROR = re.compile(r"^=========\s+(Invalid|Race|Error|Program hit|.*[Hh]azard|.*out of bounds|"
                              r"Uninitialized)", re.M)


def sanitizer_verdicts(code: int | None, output: str, expected: dict[str, list[str]]) -> dict[str, dict[str, str]]:
    """Per family and backend, from one sanitizer run's output (the workload frames each (family, backend) with
    markers): "pass"; "fail (N errors)"; "fail (kernels outside the filter: ...)"; "workload failed (...)"; or,
    when its start marker never came, "timeout" (the run was killed) or "not reached". Only "pass" passes."""
    verdicts: dict[str, dict[str, str]] = {}
    for family, backends in expected.items():
        for backend in backends:
            tag = f"{MARK} {family} {backend} "
            begin = output.find(tag + "start")
            if begin < 0:
                verdict = "timeout" if code is None else "not reached"
            else:
                end = output.find(tag + "done", begin)
                segment = output[begin:end if end >= 0 else len(output)]
                errors = len(_SANITIZER_ERROR.findall(segment))
                raised = re.search(re.escape(tag) + r"raised (.*)", segment)
                kernels = re.search(re.escape(tag) + r"kernels (\S+)", segment)
                outside = sorted(set(kernels.group(1).split(",")) - set(plan.TRITON_KERNELS) - {"-"}) if kernels \
                    else []
                if errors:
                    verdict = f"fail ({errors} errors)"
                elif raised:
                    verdict = f"workload failed ({raised.group(1)[:200]})"
                elif outside:
                    verdict = f"fail (kernels outside the sanitizer's filter: {', '.join(outside)})"
                elif end < 0:
                    verdict = "timeout" if code is None else "workload failed"
                else:
                    verdict = "pass"
            verdicts.setdefault(family, {})[backend] = verdict
    return verdicts


def sanitizer(ctx: Context, summary: Summary, limit: float) -> None:
    from benchmarks.gpu_check import workload

    start, deadline = time.time(), time.time() + limit
    device = "cpu" if ctx.dry else "cuda"
    expected = {f: workload.backends(f, device) for f in ctx.families}
    tools = ("dry-run",) if ctx.dry else plan.SANITIZER_TOOLS
    target = ctx.python("benchmarks.gpu_check.workload", "--device", device, "--families", ",".join(ctx.families))
    log = os.path.join(ctx.out, "sanitizer.log")
    tool_path = None if ctx.dry else find_tool("compute-sanitizer")
    if not ctx.dry and tool_path is None:
        with summary.lock:
            for family, backends in expected.items():
                for backend in backends:
                    summary.data["sanitizer"].setdefault(family, {})[backend] = {t: "skipped (no compute-sanitizer)"
                                                                                 for t in tools}
        summary.phase("sanitizer", status="fail: no compute-sanitizer", s=0.0, limit_s=round(limit))
        return
    env = ctx.env(TRITON_INTERPRET="1") if ctx.dry else ctx.env(TRITON_CACHE_DIR=os.path.join(ctx.work, "triton",
                                                                                              "shared"))

    def command(tool: str, filtered: bool = True) -> list[str]:
        if ctx.dry:
            return target
        return [tool_path, "--tool", tool, *(plan.sanitizer_filter() if filtered else []), "--print-limit", "200",
                *target]

    def record(tool, code, output, note=""):
        for family, backends in sanitizer_verdicts(code, output, expected).items():
            for backend, verdict in backends.items():
                summary.data["sanitizer"].setdefault(family, {}).setdefault(backend, {})[tool] = verdict
        declined = sorted(set(re.findall(re.escape(MARK) + r" (\S+ \S+) declined (.*)", output)))
        summary.data.setdefault("sanitizer_declined", {})[tool] = [" ".join(d) for d in declined]
        if note:
            summary.data.setdefault("sanitizer_notes", {})[tool] = note
        summary.save()

    retry = []

    def done(job, code, output, seconds):
        append_log(log, f"{job.name} ({seconds:.0f} s, exit {code})", output)
        if MARK not in output and code is not None and job.name.endswith(":filtered"):
            retry.append((job.name.split(":")[0], output.strip().splitlines()[-3:]))
            return  # the tool refused its arguments before the workload began: once more, unfiltered
        record(job.name.split(":")[0], code, output)
        print(f"gpu-check: sanitizer {job.name} exit {code} ({seconds:.0f} s)", flush=True)

    jobs = [Job(f"{t}:filtered", command(t), env, os.path.join(ctx.work, f"sanitizer-{t}.log")) for t in tools]
    run_jobs(jobs, deadline, len(jobs), done, summary.lock)
    if retry:
        notes = {tool: f"the kernel filter was refused ({' / '.join(lines)}); ran unfiltered" for tool, lines in retry}

        def done_again(job, code, output, seconds):
            append_log(log, f"{job.name} ({seconds:.0f} s, exit {code})", output)
            record(job.name.split(":")[0], code, output, notes[job.name.split(":")[0]])

        run_jobs([Job(f"{t}:unfiltered", command(t, False), env, os.path.join(ctx.work, f"sanitizer-{t}-2.log"))
                  for t, _ in retry], deadline, len(retry), done_again, summary.lock)
    summary.phase("sanitizer", status="done", s=round(time.time() - start, 1), limit_s=round(limit))


# ------------------------------------------------------------------------------------------------------- bench
def bench_args(ctx: Context) -> list[str]:
    args = ["--quick"] + [a for f in plan.BENCH_FAMILIES if f in ctx.families for a in ("--family", f)]
    return args + (["--device", "cpu", "--smoke"] if ctx.dry else [])


def bench(ctx: Context, summary: Summary, limit: float) -> None:
    """The headline cases, alone on the GPU (a dry run: one tiny case per op on the CPU), into bench.json, .md, .png
    of the output folder."""
    start = time.time()
    if not any(f in ctx.families for f in plan.BENCH_FAMILIES):
        with summary.lock:
            summary.data["bench"] = {"status": "not run (no benchmarked family chosen)"}
        summary.phase("bench", status="skipped", s=0.0, limit_s=round(limit))
        return
    cmd = ctx.python("benchmarks.run", *bench_args(ctx), "--out", ctx.out, "--name", "bench", "--one-figure")
    env = ctx.env(TRITON_CACHE_DIR=os.path.join(ctx.work, "triton", "shared"))
    result = {}

    def done(job, code, output, seconds):
        result["status"] = "pass" if code == 0 else "timeout" if code is None else "fail"
        append_log(os.path.join(ctx.out, "gpu-check.log"), f"bench ({seconds:.0f} s, exit {code})", output)

    run_jobs([Job("bench", cmd, env, os.path.join(ctx.work, "bench.log"))], start + limit, 1, done, summary.lock)
    try:
        with open(os.path.join(ctx.out, "bench.json")) as f:
            data = json.load(f)
        result.update(ceilings=data.get("ceilings", {}), timings=len(data.get("results", [])))
    except (OSError, ValueError):
        pass
    with summary.lock:
        summary.data["bench"] = result
    summary.phase("bench", status=result.get("status", "fail"), s=round(time.time() - start, 1), limit_s=round(limit))
