"""`make gpu-check`: the first minutes on a GPU machine, prepared. ``python -m benchmarks.gpu_check [OUT]``.

For a machine with a GPU and torch preinstalled (the lent H200: torch 2.11 cu130, triton 3.6, 16 cores, no
package index), in about 7 minutes and at most 10:

1. builds genfast's extension for this GPU's architecture only, with every core;
2. runs the test suite's GPU cases, family by family in order of risk, each within its share of the time
   (compiled Triton and CUDA backends; the tests carry bf16/fp16/fp32 and odd sizes);
3. runs ``compute-sanitizer`` memcheck over a small call of every CUDA kernel, and racecheck over the
   kernels that use shared memory;
4. runs the headline benchmark cases, with the copy and matmul ceilings of this run.

Everything lands in one folder (argument, else $GPU_CHECK_OUT, else runs/gpu-check), at most 8 files
(the device tool brings back 8): gpu-check.log (build and tests), sanitizer.log, gpu-check.json and .md
(pass/fail per family and step), bench.json, bench.md, bench.png. Prints pass or fail per family. Without a
GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Step:
    family: str
    tests: list[str]  # pytest files
    risk: int  # higher runs first and gets a larger share of the time
    share: float  # fraction of the test budget


# GPU test cases by family, most likely to fail first: the large tiled kernels (autotuned tiles, tensor cores,
# shared memory) before the elementwise ones. ``-k cuda`` keeps the cases on the GPU.
TEST_PLAN = [
    Step("attention", ["tests/test_attention.py"], 10, 0.22),
    Step("conv_transpose", ["tests/test_conv_transpose.py", "tests/test_conv_transpose_cuda.py"], 9, 0.16),
    Step("attention_varlen", ["tests/test_attention_varlen.py"], 8, 0.14),
    Step("attention_decode", ["tests/test_attention_decode.py"], 7, 0.12),
    Step("sampling", ["tests/test_sampling.py"], 6, 0.12),
    Step("latent", ["tests/test_latent.py"], 4, 0.08),
    Step("diffusion", ["tests/test_diffusion.py"], 4, 0.08),
    Step("random", ["tests/test_random.py"], 3, 0.08),
]
MIN_STEP_S = 20  # every family runs at least this long, however the budget is cut
# Families whose CUDA kernels use shared memory: racecheck as well as memcheck.
SHARED_MEMORY_FAMILIES = ("attention_decode", "conv_transpose", "sampling", "latent")
# Seconds of the 10-minute wall per phase (build, tests, sanitizer, benchmarks), summing to about 7 minutes.
BUDGET = {"build": 150, "tests": 150, "sanitizer": 75, "bench": 60}
MAX_FILES = 8
# Everything the check writes into its folder (the benchmark run writes bench.json, bench.md and bench.png).
OUTPUT_FILES = ("gpu-check.log", "sanitizer.log", "gpu-check.json", "gpu-check.md", "bench.json", "bench.md",
                "bench.png")


def schedule(plan: list[Step], budget_s: float) -> list[tuple[Step, float]]:
    """(step, seconds) in order of risk; each family gets its share of ``budget_s`` and at least MIN_STEP_S,
    and only families whose test files exist run."""
    present = [s for s in plan if any(os.path.exists(os.path.join(ROOT, t)) for t in s.tests)]
    total = sum(s.share for s in present) or 1.0
    ordered = sorted(present, key=lambda s: -s.risk)
    return [(s, max(MIN_STEP_S, budget_s * s.share / total)) for s in ordered]


_SUMMARY = re.compile(r"(\d+) (passed|failed|error|errors|skipped)")


def pytest_outcome(returncode: int | None, output: str) -> dict:
    """Pass/fail of one family's pytest run from its exit code and summary line (None: killed at its time)."""
    counts = {word.rstrip("s"): int(n) for n, word in _SUMMARY.findall(output.splitlines()[-1] if output else "")}
    if returncode is None:
        status = "timeout"
    elif returncode == 5:
        status = "no tests"
    else:
        status = "pass" if returncode == 0 else "fail"
    return {"status": status, "passed": counts.get("passed", 0), "failed": counts.get("failed", 0) +
            counts.get("error", 0), "skipped": counts.get("skipped", 0)}


def markdown(summary: dict) -> str:
    lines = [f"# make gpu-check: {summary['device']}", "",
             f"torch {summary['torch']}, triton {summary['triton']}, commit {summary['commit']}, {summary['date']}, "
             f"{summary['wall_s']:.0f} s in all; build: {summary['build']['status']} ({summary['build']['s']:.0f} s)",
             "", "| family | tests | passed | failed | skipped | memcheck | racecheck |",
             "|---|---|---:|---:|---:|---|---|"]
    for family, r in summary["families"].items():
        t = r.get("tests", {})
        lines.append(f"| {family} | {t.get('status', 'not run')} | {t.get('passed', '')} | {t.get('failed', '')} | "
                     f"{t.get('skipped', '')} | {r.get('memcheck', 'not run')} | {r.get('racecheck', '-')} |")
    bench = summary.get("bench", {})
    lines += ["", f"Benchmarks: {bench.get('status', 'not run')} (bench.md, bench.png; ceilings: "
              f"{bench.get('ceilings', {})})", ""]
    return "\n".join(lines)


def family_verdict(result: dict) -> str:
    bad = [v for k, v in result.items() if k != "tests" and isinstance(v, str)
           and v.startswith(("fail", "error", "workload failed"))]
    tests = result.get("tests", {}).get("status", "not run")
    return "FAIL" if tests in ("fail", "timeout") or bad else "pass"


# ------------------------------------------------------------------------------------- the GPU phases
def _run(cmd: list[str], log, timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """Run ``cmd`` appending its output to ``log``; (exit code or None when killed at ``timeout``, output)."""
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else \
            (expired.stdout or "")
        output += f"\n[killed after {timeout:.0f} s]\n"
        code = None
    log.write(output)
    log.flush()
    return code, output


def build(log, arch: str) -> dict:
    env = {**os.environ, "GENFAST_CUDA_ARCHS": arch, "MAX_JOBS": str(os.cpu_count() or 4)}
    start = time.time()
    code, _ = _run([sys.executable, "-m", "pip", "install", "-e", ".", "--no-build-isolation", "--no-deps"], log,
                   BUDGET["build"] * 2, env)
    return {"status": "pass" if code == 0 else "fail", "s": time.time() - start, "arch": arch}


def run_tests(log) -> dict:
    results = {}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for step, seconds in schedule(TEST_PLAN, BUDGET["tests"]):
        files = [t for t in step.tests if os.path.exists(os.path.join(ROOT, t))]
        code, output = _run([sys.executable, "-m", "pytest", *files, "-q", "-k", "cuda", "-p", "no:cacheprovider",
                             "-o", "addopts="], log, seconds, env)
        results[step.family] = pytest_outcome(code, output)
    return results


def run_sanitizer(log) -> dict:
    """memcheck over every family's workload, racecheck over the shared-memory families', one sanitizer process
    per tool (its start-up is the slow part); each error is charged to the family whose workload was running."""
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    families = [s.family for s in TEST_PLAN]
    if not os.path.exists(tool):
        return {f: {"memcheck": "skipped (no compute-sanitizer)"} for f in families}
    out: dict[str, dict] = {f: {} for f in families}
    for check, chosen, share in (("memcheck", families, 0.6), ("racecheck", list(SHARED_MEMORY_FAMILIES), 0.4)):
        cmd = [tool, "--tool", check, "--kernel-name", "kns=genfast", sys.executable, "-m", "benchmarks.gpu_check",
               "--workload", ",".join(chosen)]
        code, output = _run(cmd, log, BUDGET["sanitizer"] * share * 2)
        for family, verdict in sanitizer_by_family(code, output, chosen).items():
            out[family][check] = verdict
    return out


_ERROR_LINE = re.compile(r"^=========\s+(Invalid|Race|Error|.*[Hh]azard|.*out of bounds|Uninitialized)", re.M)


def sanitizer_by_family(code: int | None, output: str, families: list[str]) -> dict[str, str]:
    """Per family: "pass", "fail (N errors)", "workload failed", or "not reached"/"timeout" from the sanitizer
    output, whose workload prints ``gpu-check workload: <family> start`` / ``done`` around each family."""
    verdicts = {}
    for family in families:
        begin = output.find(f"gpu-check workload: {family} start")
        if begin < 0:
            verdicts[family] = "timeout" if code is None else "not reached"
            continue
        end = output.find(f"gpu-check workload: {family} done", begin)
        errors = len(_ERROR_LINE.findall(output[begin:end if end >= 0 else len(output)]))
        if errors:
            verdicts[family] = f"fail ({errors} errors)"
        elif end < 0:
            verdicts[family] = "timeout" if code is None else "workload failed"
        else:
            verdicts[family] = "pass"
    return verdicts


def workload(families: str) -> None:
    """A small call of each CUDA kernel of each of ``families`` (comma-separated; odd sizes, bf16/fp16/fp32),
    for compute-sanitizer; markers around each family let its errors be charged to it."""
    for family in families.split(","):
        print(f"gpu-check workload: {family} start", flush=True)
        _family_workload(family)
        print(f"gpu-check workload: {family} done", flush=True)


def _family_workload(family: str) -> None:
    import torch

    import genfast
    from genfast import ops

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    with genfast.backend("cuda"):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            r = lambda *s: torch.randn(*s, device=dev, generator=g).to(dtype)  # noqa: E731
            if family == "attention":
                q, k = r(2, 4, 97, 64).requires_grad_(), r(2, 2, 97, 64).requires_grad_()
                ops.attention(q, k, k, causal=True).sum().backward()
            elif family == "attention_varlen":
                q = r(40, 4, 64).requires_grad_()
                cu = torch.tensor([0, 17, 18, 40], device=dev, dtype=torch.int32)
                ops.attention_varlen(q, q, q, cu, cu, 22, 22, causal=True).sum().backward()
            elif family == "attention_decode":
                cache = r(3, 2, 97, 64)
                lengths = torch.tensor([1, 50, 96], device=dev, dtype=torch.int32)
                ops.kv_cache_append(cache, cache.clone(), r(3, 2, 1, 64), r(3, 2, 1, 64), lengths)
                ops.attention_decode(r(3, 8, 1, 64), cache, cache, lengths + 1)
            elif family == "conv_transpose":
                x, w = r(2, 17, 9, 9).requires_grad_(), r(17, 5, 4, 4)
                ops.conv_transpose2d(x, w, r(5), stride=2, padding=1, activation="relu").sum().backward()
            elif family == "sampling":
                logits = r(3, 1001)
                ops.sample_tokens(logits, temperature=0.8, top_k=17, top_p=0.9, generator=g)
                ops.filter_logits(logits, top_p=0.5)
            elif family == "diffusion":
                x = r(2, 3, 17, 17)
                coefs = torch.rand(11, device=dev, generator=g)
                ops.scheduler_step(x, x, coefs, generator=g)
                ops.cfg_combine(x, x, 3.0)
            elif family == "latent":
                mu = r(3, 97)
                ops.reparameterize(mu, mu, generator=g)
                ops.gaussian_kl(mu, mu)
                ops.langevin_step(mu, mu, 0.01, 0.1, generator=g)
            elif family == "random":
                ops.philox_noise(7, 1001, normal=True, device=dev)
    torch.cuda.synchronize()


def run_bench(out: str, log) -> dict:
    """The headline cases (--quick) of the kernel families, with this run's ceilings, into ``out``."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--out", out, "--name", "bench", "--one-figure"]
    for family in ("attention", "conv_transpose", "sampling", "diffusion", "latent", "random"):
        cmd += ["--family", family]
    code, _ = _run(cmd, log, BUDGET["bench"] * 2)
    result = {"status": "pass" if code == 0 else ("timeout" if code is None else "fail")}
    try:
        with open(os.path.join(out, "bench.json")) as f:
            result["ceilings"] = json.load(f).get("ceilings", {})
    except (OSError, ValueError):
        pass
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default=os.environ.get("GPU_CHECK_OUT") or os.path.join(ROOT, "runs",
                                                                                                   "gpu-check"))
    parser.add_argument("--workload", help=argparse.SUPPRESS)  # the sanitizer's target process
    parser.add_argument("--skip-build", action="store_true", help="use the extension as it is")
    args = parser.parse_args(argv)
    if args.workload:
        workload(args.workload)
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no GPU here (torch.cuda.is_available() is False): nothing to check, see `make test`")
        return 0
    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}" + ("a" if major == 9 else "")
    summary = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": _commit(),
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        import triton

        summary["triton"] = triton.__version__
    except ImportError:
        summary["triton"] = None
    with open(os.path.join(args.out, "gpu-check.log"), "w") as log:
        summary["build"] = {"status": "skipped", "s": 0.0} if args.skip_build else build(log, arch)
        print(f"gpu-check: build for sm_{arch}: {summary['build']['status']} ({summary['build']['s']:.0f} s)",
              flush=True)
        tests = run_tests(log)
    with open(os.path.join(args.out, "sanitizer.log"), "w") as log:
        sanitized = run_sanitizer(log)
    with open(os.path.join(args.out, "gpu-check.log"), "a") as log:
        summary["bench"] = run_bench(args.out, log)
    summary["families"] = {s.family: {"tests": tests.get(s.family, {"status": "not run"}), **sanitized.get(s.family,
                                                                                                         {})}
                           for s in TEST_PLAN}
    summary["wall_s"] = time.time() - start
    with open(os.path.join(args.out, "gpu-check.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(args.out, "gpu-check.md"), "w") as f:
        f.write(markdown(summary))
    failed = [f for f, r in summary["families"].items() if family_verdict(r) == "FAIL"]
    for family, result in summary["families"].items():
        print(f"gpu-check: {family:18s} {family_verdict(result)}  tests {result['tests']['status']}, "
              f"memcheck {result.get('memcheck', '-')}, racecheck {result.get('racecheck', '-')}")
    print(f"gpu-check: benchmarks {summary['bench']['status']}; {summary['wall_s']:.0f} s; results in {args.out}")
    files = os.listdir(args.out)
    if len(files) > MAX_FILES:
        print(f"gpu-check: warning: {len(files)} files in {args.out}, more than the {MAX_FILES} a device run returns")
    return 1 if failed or summary["build"]["status"] == "fail" else 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "nocommit"


if __name__ == "__main__":
    raise SystemExit(main())
