"""`make gpu-check` (benchmarks/gpu_check/): the plan's arithmetic, how it reads its processes' output, the lent-image
import blocker, and its GPU-only paths driven with stand-ins. `make gpu-check-dry` (part of `make test`) runs the
whole plan on the CPU; these tests check the pieces it cannot: timeouts, sanitizer errors, a refused filter."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from benchmarks.compile.cases import FAMILIES
from benchmarks.gpu_check import phases, plan, summary, workload
from benchmarks.gpu_check.__main__ import main as gpu_check_main

ROOT = plan.ROOT


def test_every_family_is_tested_sanitized_and_its_files_exist():
    assert sorted(plan.FAMILIES) == sorted(FAMILIES) == sorted(workload.CALLS)
    for step in plan.TEST_STEPS + plan.AUTOTUNED:
        for path in step.files:
            assert os.path.exists(os.path.join(ROOT, path)), (step.name, path)
    assert {s.family for s in plan.TEST_STEPS} == set(plan.FAMILIES)


def test_phase_limits_fit_one_device_call_and_the_retry_fits_its_share():
    assert sum(plan.PHASE_LIMITS.values()) <= 540
    retry = plan.phase_limits(plan.RETRY_TOTAL_S, skip_build=True)
    assert "build" not in retry and sum(retry.values()) == pytest.approx(plan.RETRY_TOTAL_S)
    assert plan.RETRY_TOTAL_S <= 180
    assert plan.phase_limits(None, skip_build=False) == {k: float(v) for k, v in plan.PHASE_LIMITS.items()}


def test_time_comes_from_compile_counts_and_the_tests_phase_is_predicted_to_fit():
    counts, source = plan.compile_counts()
    chosen = plan.steps()
    assert source and all(counts.get(s.name, 0) > 0 for s in chosen), (source, counts)
    est = plan.estimates(chosen, counts)
    assert est == {s.name: plan.STARTUP_S + counts[s.name] * plan.SECONDS_PER_COMPILE for s in chosen}
    ordered = plan.order(chosen, counts)
    assert [est[s.name] for s in ordered] == sorted(est.values(), reverse=True)
    assert plan.makespan(chosen, counts, plan.LENT_CORES) <= plan.PHASE_LIMITS["tests"]
    # One slot runs them back to back; more slots never take longer.
    assert plan.makespan(chosen, counts, 1) == pytest.approx(sum(est.values()))
    assert plan.makespan(chosen, counts, 4) >= plan.makespan(chosen, counts, 16) >= max(est.values())


def test_correctness_steps_run_without_autotuning_and_each_accumulating_kernel_has_an_autotuned_one():
    assert not any(s.autotune for s in plan.TEST_STEPS)
    assert all(s.autotune and "cuda" in s.keyword for s in plan.AUTOTUNED)
    # The attention dK/dV kernel adds dQ with atomics, in both layouts that launch it.
    assert {s.family for s in plan.AUTOTUNED} == {"attention", "attention_varlen"}


def test_the_dtype_shards_cover_every_dtype_once():
    from _pytest.mark.expression import Expression

    shards = {k: Expression.compile(v) for k, v in plan.DTYPE_SHARDS.items()}
    for test_id in ("x[cuda-triton-torch.float32]", "x[cuda-triton-torch.float16]", "x[cuda-triton-torch.bfloat16]",
                    "x[cuda-triton]", "x[cuda-fp32]", "x[sm90-fp16-128]", "x[bf16-cl]"):
        hits = [k for k, e in shards.items() if e.evaluate(lambda name, **_: name in test_id)]
        assert len(hits) == 1, (test_id, hits)


def _triton_kernels_in_source() -> set[str]:
    names = set()
    for path in os.listdir(os.path.join(ROOT, "genfast", "kernels")):
        if path.endswith(".py"):
            with open(os.path.join(ROOT, "genfast", "kernels", path)) as f:
                names |= set(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", f.read()))
    return names


def test_the_sanitizer_filter_names_every_triton_kernel():
    # Every kernel a family of the plan launches; a kernel of a family not yet in the plan fails the first test.
    launched = {n for n in _triton_kernels_in_source() if not n.startswith("_lstm")}
    assert launched <= set(plan.TRITON_KERNELS), launched - set(plan.TRITON_KERNELS)
    args = plan.sanitizer_filter()
    assert args[::2] == ["--kernel-name"] * (len(plan.TRITON_KERNELS) + 1)
    assert "kns=genfast" in args and "kns=_bwd_dkdv_kernel" in args


def test_the_gpu_workload_runs_both_gpu_backends_where_they_exist():
    assert workload.backends("attention", "cuda") == ["triton"]  # no CUDA kernel: triton alone
    assert workload.backends("conv_transpose", "cuda") == ["cuda", "triton"]
    assert workload.backends("attention_decode", "cuda") == ["cuda", "triton"]
    assert workload.backends("latent", "cpu") == ["triton", "reference"]


@pytest.mark.parametrize("code, output, expected", [
    (0, "tests/a.py::t[1] PASSED [ 50%]\ntests/a.py::t[2] SKIPPED (x) [100%]\n== 1 passed, 1 skipped in 1s ==",
     {"status": "pass", "passed": 1, "failed": 0, "skipped": 1, "failures": []}),
    (1, "tests/a.py::t[1] FAILED [ 50%]\ntests/a.py::u PASSED [100%]\nERROR tests/b.py - ImportError\n",
     {"status": "fail", "passed": 1, "failed": 1, "skipped": 0, "failures": ["tests/a.py::t[1]", "tests/b.py"]}),
    (None, "tests/a.py::t[1] PASSED [  1%]\n[killed at the phase's deadline after 20 s]",
     {"status": "timeout", "passed": 1, "failed": 0, "skipped": 0, "failures": []}),
    (5, "no tests ran", {"status": "no tests", "passed": 0, "failed": 0, "skipped": 0, "failures": []}),
    (4, "ERROR: usage", {"status": "error", "passed": 0, "failed": 0, "skipped": 0, "failures": []}),
])
def test_pytest_outcome_counts_what_ran_even_when_killed(code, output, expected):
    assert phases.pytest_outcome(code, output) == expected


def test_sanitizer_verdicts_fail_everything_but_a_clean_finished_run():
    m = workload.MARK
    output = "\n".join([
        f"{m} attention triton start", f"{m} attention triton kernels _fwd_kernel,_bwd_dkdv_kernel",
        f"{m} attention triton done",
        f"{m} sampling cuda start", "========= Invalid __global__ read of size 4 bytes",
        "========= Race reported between Write access at 0x10 and Read access at 0x20", f"{m} sampling cuda done",
        f"{m} sampling triton start", f"{m} sampling triton kernels _sampling_kernel,_new_kernel",
        f"{m} sampling triton done",
        f"{m} latent cuda start", f"{m} latent cuda raised RuntimeError: boom",
        f"{m} latent triton start", "Traceback (most recent call last):",
        "========= ERROR SUMMARY: 2 errors"])
    expected = {"attention": ["triton"], "sampling": ["cuda", "triton"], "latent": ["cuda", "triton"],
                "random": ["cuda"]}
    v = phases.sanitizer_verdicts(1, output, expected)
    assert v["attention"] == {"triton": "pass"}
    assert v["sampling"]["cuda"] == "fail (2 errors)"
    assert v["sampling"]["triton"] == "fail (kernels outside the sanitizer's filter: _new_kernel)"
    assert v["latent"] == {"cuda": "workload failed (RuntimeError: boom)", "triton": "workload failed"}
    assert v["random"] == {"cuda": "not reached"}
    killed = phases.sanitizer_verdicts(None, f"{m} attention triton start", {"attention": ["triton"],
                                                                            "random": ["cuda"]})
    assert killed == {"attention": {"triton": "timeout"}, "random": {"cuda": "timeout"}}


def _summary(tmp_path, mode="gpu"):
    s = summary.Summary(str(tmp_path), mode, {"device": "d", "plan": {"families": ["attention", "random"],
                                                                       "sanitizer_tools": ["memcheck"]}})
    return s


def test_family_verdicts_count_not_reached_skipped_and_missing_as_failures(tmp_path):
    s = _summary(tmp_path)
    s.save()
    assert s.data["families"] == {"attention": "FAIL: tests: not run; sanitizer: not run",
                                  "random": "FAIL: tests: not run; sanitizer: not run"}
    s.data["tests"]["attention-fp32"] = {"family": "attention", "status": "pass"}
    s.data["tests"]["random"] = {"family": "random", "status": "timeout"}
    s.data["sanitizer"] = {"attention": {"triton": {"memcheck": "pass"}},
                           "random": {"cuda": {"memcheck": "pass"}, "triton": {"memcheck": "skipped (x)"}}}
    s.save()
    assert s.data["families"]["attention"] == "pass"
    assert s.data["families"]["random"] == "FAIL: tests random: timeout; memcheck triton: skipped (x)"
    assert s.failed_families() == ["random"]
    on_disk = json.loads((tmp_path / "gpu-check.json").read_text())
    assert on_disk["families"] == s.data["families"]
    md = (tmp_path / "gpu-check.md").read_text()
    assert "| random | FAIL: tests random: timeout" in md and "| random | triton | skipped (x) |" in md


def test_run_jobs_runs_side_by_side_and_kills_at_the_deadline_keeping_the_output(tmp_path):
    done = {}
    py = sys.executable
    jobs = [phases.Job("quick", [py, "-c", "print('hi')"], dict(os.environ), str(tmp_path / "q.log")),
            phases.Job("slow", [py, "-c", "import time; print('begun', flush=True); time.sleep(60)"],
                       dict(os.environ), str(tmp_path / "s.log")),
            phases.Job("late", [py, "-c", "print('x')"], dict(os.environ), str(tmp_path / "l.log"))]
    start = time.time()
    phases.run_jobs(jobs, start + 4, 2, lambda job, code, out, s: done.setdefault(job.name, (code, out)))
    assert time.time() - start < 15
    assert done["quick"][0] == 0 and "hi" in done["quick"][1]
    assert done["slow"][0] is None and "begun" in done["slow"][1]
    assert "killed at the phase's deadline" in done["slow"][1]
    assert done["late"][0] == 0  # started when "quick" freed its slot


def test_lent_image_hides_what_the_lent_machine_lacks_and_keeps_what_it_has():
    import importlib.util

    from benchmarks.gpu_check import lent_image

    dists, modules = lent_image.hidden()
    for kept in ("torch", "numpy", "pytest", "transformers", "safetensors", "genfast", "triton"):
        assert kept not in modules
    for lacking in ("diffusers", "pytest_benchmark", "ruff"):  # each hidden wherever it is installed
        assert (lacking in modules) == (importlib.util.find_spec(lacking) is not None)


def test_lent_image_makes_hidden_packages_unimportable_in_a_child(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("import importlib.util, importlib.metadata as md\n"
                      "print('find_spec', importlib.util.find_spec('diffusers'))\n"
                      "print('dists', 'pytest-benchmark' in {d.metadata['Name'] for d in md.distributions()})\n"
                      "import numpy, genfast\n"
                      "try:\n    import diffusers\nexcept ModuleNotFoundError as e:\n    print('blocked', e.name)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", "import sys, runpy; "
                           "from benchmarks.gpu_check import lent_image; lent_image.install(); "
                           "runpy.run_path(sys.argv[1], run_name='__main__')", str(script)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "find_spec None" in done.stdout and "dists False" in done.stdout and "blocked diffusers" in done.stdout


def test_bench_modules_of_the_plan_load_without_diffusers():
    code = ("import sys; from benchmarks.gpu_check import lent_image; lent_image.install(); import torch; "
            "from benchmarks import run; "
            f"cases = run.collect_cases(torch.device('cpu'), {list(plan.BENCH_FAMILIES)!r}, True); "
            "assert 'diffusers' not in sys.modules; "
            "assert not any(c.provider == 'diffusers' for c in cases); print(len(cases))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 0


def test_the_workload_reaches_every_family_under_the_cpu_backends():
    """The dry run's sanitizer phase in small: one family, each CPU backend, with the verdict parser."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check.workload", "--device", "cpu", "--families",
                           "random,diffusion"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    expected = {"random": ["cpu", "triton", "reference"], "diffusion": ["cpu", "triton", "reference"]}
    verdicts = phases.sanitizer_verdicts(done.returncode, done.stdout, expected)
    assert verdicts == {f: {b: "pass" for b in bs} for f, bs in expected.items()}
    assert "random triton kernels _philox_noise_kernel" in done.stdout


def _fake_sanitizer(tmp_path, refuse_filter: bool):
    """A compute-sanitizer stand-in: refuses --kernel-name if asked, else runs the target on the CPU (the workload's
    --device cuda becomes cpu) and reports one planted error in the random family's triton run."""
    tool = tmp_path / "compute-sanitizer"
    tool.write_text(f"""#!{sys.executable}
import os, subprocess, sys
args = sys.argv[1:]
if {refuse_filter!r} and "--kernel-name" in args:
    print("========= Error: option '--kernel-name' cannot be specified more than once"); sys.exit(1)
i = args.index("{sys.executable}")
target = [a if a != "cuda" else "cpu" for a in args[i:]]
out = subprocess.run(target, capture_output=True, text=True, env={{**os.environ, "TRITON_INTERPRET": "1"}}).stdout
done = "{workload.MARK} random triton done"
print(out.replace(done, "========= Invalid __global__ write of size 4 bytes\\n" + done), end="")
""")
    tool.chmod(0o755)
    return tool


@pytest.mark.parametrize("refuse_filter", [False, True], ids=["filter-kept", "filter-refused"])
def test_gpu_sanitizer_phase_with_a_stand_in_tool(tmp_path, monkeypatch, refuse_filter):
    tool = _fake_sanitizer(tmp_path, refuse_filter)
    monkeypatch.setattr(phases, "find_tool", lambda name: str(tool) if name == "compute-sanitizer" else None)
    monkeypatch.setattr(workload, "backends", lambda family, device: ["cpu", "triton"])
    monkeypatch.setattr(plan, "SANITIZER_TOOLS", ("memcheck",))
    out = tmp_path / "out"
    ctx = phases.Context("gpu", str(out), str(tmp_path / "work"), ["random"], 2)
    s = summary.Summary(str(out), "gpu", {"plan": {"families": ["random"], "sanitizer_tools": ["memcheck"]}})
    phases.sanitizer(ctx, s, 200)
    assert s.data["sanitizer"]["random"] == {"cpu": {"memcheck": "pass"}, "triton": {"memcheck": "fail (1 errors)"}}
    notes = s.data.get("sanitizer_notes", {})
    assert ("memcheck" in notes and "ran unfiltered" in notes["memcheck"]) == refuse_filter
    assert "--kernel-name" in (out / "sanitizer.log").read_text()


def test_gpu_sanitizer_phase_without_the_tool_fails_every_family(tmp_path, monkeypatch):
    monkeypatch.setattr(phases, "find_tool", lambda name: None)
    ctx = phases.Context("gpu", str(tmp_path), str(tmp_path / "work"), ["random", "latent"], 2)
    s = summary.Summary(str(tmp_path), "gpu", {"plan": {"families": ["random", "latent"],
                                                         "sanitizer_tools": list(plan.SANITIZER_TOOLS)}})
    assert not phases.check_tools(ctx, s) and s.data["tools"]["compute-sanitizer"] == "MISSING"
    phases.sanitizer(ctx, s, 10)
    s.data["tests"] = {"random": {"family": "random", "status": "pass"}, "latent": {"family": "latent",
                                                                                   "status": "pass"}}
    s.save()
    assert all(v.startswith("FAIL") and "skipped (no compute-sanitizer)" in v for v in s.data["families"].values())


def test_usage_errors_exit_2(monkeypatch, capsys):
    monkeypatch.delenv("GPU_CHECK_OUT", raising=False)
    for argv in ([], ["out", "--families", "attention,nope"], ["out", "--total-s", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            gpu_check_main(argv)
        assert exit_info.value.code == 2
    assert "GPU_CHECK_OUT" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_without_a_gpu_the_real_run_says_so_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "gpu"
    assert gpu_check_main([str(out)]) == 0
    assert "no GPU here" in capsys.readouterr().out
    assert not out.exists()


def _bench_file(path, date):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": "d", "commit": "c", "date": date, "results": [{"family": "random"}]}))


def test_report_reads_gpu_bench_results_and_skips_the_gpu_check_summary(tmp_path):
    from benchmarks import report

    _bench_file(tmp_path / "cpu-20261129-abc.json", "2026-11-29T00:00:00Z")
    _bench_file(tmp_path / "gpu" / "20261206-def" / "bench.json", "2026-12-06T00:00:00Z")
    (tmp_path / "gpu" / "20261206-def" / "gpu-check.json").write_text(json.dumps({"mode": "gpu", "families": {}}))
    (tmp_path / "compile-sm90a-triton3.6.0.json").write_text(json.dumps({"rows": []}))
    assert report.latest_results(str(tmp_path)) == str(tmp_path / "gpu" / "20261206-def" / "bench.json")


def test_publish_copies_a_gpu_run_into_its_dated_folder_once(tmp_path, monkeypatch):
    from benchmarks.gpu_check import __main__ as cli

    monkeypatch.setattr(plan, "RESULTS_GPU", str(tmp_path / "results"))
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    (fetched / "gpu-check.json").write_text(json.dumps({"mode": "gpu", "date": "2026-12-06T04:00:00Z",
                                                        "commit": "abc1234"}))
    (fetched / "bench.json").write_text("{}")
    assert cli.main(["--publish", str(fetched)]) == 0
    dest = tmp_path / "results" / "20261206-abc1234"
    assert sorted(os.listdir(dest)) == ["bench.json", "gpu-check.json"]
    assert cli.main(["--publish", str(fetched)]) == 1  # never overwritten
    (fetched / "gpu-check.json").write_text(json.dumps({"mode": "dry-run", "date": "2026-12-07T00:00:00Z",
                                                        "commit": "x"}))
    assert cli.main(["--publish", str(fetched)]) == 1  # a dry run is not a GPU result


def test_gpu_tests_phase_with_a_stand_in_step(tmp_path, monkeypatch):
    """The GPU run's tests phase, driven on the CPU: a real pytest step (its -v output read back, its own Triton
    cache counted, the summary written after it), the warm-up jobs beside it (they fail here: no GPU)."""
    step = plan.Step("stand-in", "random", ("tests/test_gpu_check.py",), "usage_errors or shards")
    monkeypatch.setattr(plan, "steps", lambda families=None: [step])
    monkeypatch.setattr(plan, "BENCH_FAMILIES", ())
    out = tmp_path / "out"
    ctx = phases.Context("gpu", str(out), str(tmp_path / "work"), ["random"], 4)
    s = summary.Summary(str(out), "gpu", {"plan": {"families": ["random"], "sanitizer_tools": ["memcheck"]}})
    phases.tests(ctx, s, 240)
    result = s.data["tests"]["stand-in"]
    assert result["status"] == "pass" and result["passed"] == 2 and result["failed"] == 0, result
    assert result["compiles"] == 0 and not result["autotune"]
    assert set(s.data["phases"]["tests"]["warm"]) == {"warm-workload-random"}  # no benchmarked family chosen
    assert s.data["phases"]["tests"]["s"] < 200  # it ended when its jobs did, not at the deadline
    on_disk = json.loads((out / "gpu-check.json").read_text())
    assert on_disk["tests"]["stand-in"]["passed"] == 2
    assert "test_usage_errors_exit_2 PASSED" in (out / "gpu-check.log").read_text()
