"""The CPU-testable parts of `make gpu-check` (benchmarks/gpu_check.py): selection, outcomes, report, no-GPU exit."""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.compile.cases import FAMILIES


def test_every_kernel_family_is_tested_and_sanitized():
    assert sorted(s.family for s in gpu_check.TEST_PLAN) == sorted(FAMILIES)
    for step in gpu_check.TEST_PLAN:
        assert any(os.path.exists(os.path.join(gpu_check.ROOT, t)) for t in step.tests), step.family
    assert set(gpu_check.SHARED_MEMORY_FAMILIES) <= set(FAMILIES)


def test_schedule_runs_riskiest_first_within_the_budget():
    plan = gpu_check.schedule(gpu_check.TEST_PLAN, 150)
    risks = [s.risk for s, _ in plan]
    assert risks == sorted(risks, reverse=True) and plan[0][0].family == "attention"
    assert all(seconds >= gpu_check.MIN_STEP_S for _, seconds in plan)
    assert sum(seconds for _, seconds in plan) <= 150 + gpu_check.MIN_STEP_S * len(plan)
    # A tiny budget still gives every family its minimum; a missing test file drops only its family.
    assert all(seconds == gpu_check.MIN_STEP_S for _, seconds in gpu_check.schedule(gpu_check.TEST_PLAN, 1))
    ghost = gpu_check.Step("ghost", ["tests/test_does_not_exist.py"], 99, 0.5)
    assert "ghost" not in [s.family for s, _ in gpu_check.schedule([ghost, *gpu_check.TEST_PLAN], 150)]


def test_the_whole_check_fits_ten_minutes_and_eight_files():
    assert sum(gpu_check.BUDGET.values()) <= 7.5 * 60  # planned ~7 min; the per-phase caps stop it by 10
    assert len(gpu_check.OUTPUT_FILES) <= gpu_check.MAX_FILES == 8


@pytest.mark.parametrize("code, output, expected", [
    (0, "....\n4 passed, 1 skipped in 3.2s", {"status": "pass", "passed": 4, "failed": 0, "skipped": 1}),
    (1, "F.\n1 failed, 1 passed, 2 errors in 1.0s", {"status": "fail", "passed": 1, "failed": 3, "skipped": 0}),
    (None, "..\n[killed after 20 s]", {"status": "timeout", "passed": 0, "failed": 0, "skipped": 0}),
    (5, "no tests ran in 0.1s", {"status": "no tests", "passed": 0, "failed": 0, "skipped": 0}),
])
def test_pytest_outcome(code, output, expected):
    assert gpu_check.pytest_outcome(code, output) == expected


def test_sanitizer_errors_are_charged_to_the_family_that_ran():
    output = "\n".join([
        "gpu-check workload: attention start", "gpu-check workload: attention done",
        "gpu-check workload: sampling start",
        "========= Invalid __global__ read of size 4 bytes", "=========     at sample_kernel+0x1d0",
        "========= Race reported between Write access at 0x10 and Read access at 0x20",
        "gpu-check workload: sampling done",
        "gpu-check workload: latent start", "Traceback (most recent call last):",
        "========= ERROR SUMMARY: 2 errors"])
    families = ["attention", "sampling", "latent", "random"]
    assert gpu_check.sanitizer_by_family(1, output, families) == {
        "attention": "pass", "sampling": "fail (2 errors)", "latent": "workload failed", "random": "not reached"}
    assert gpu_check.sanitizer_by_family(None, "gpu-check workload: attention start", ["attention", "random"]) == {
        "attention": "timeout", "random": "timeout"}
    assert gpu_check.family_verdict({"tests": {"status": "pass"}, "memcheck": "workload failed"}) == "FAIL"


def test_report_and_verdicts():
    summary = {"device": "NVIDIA H200", "torch": "2.11.0+cu130", "triton": "3.6.0", "commit": "abc", "date": "d",
               "wall_s": 420.0, "build": {"status": "pass", "s": 120.0},
               "bench": {"status": "pass", "ceilings": {"copy_GBps": 4000.0}},
               "families": {"attention": {"tests": {"status": "pass", "passed": 9, "failed": 0, "skipped": 1},
                                          "memcheck": "pass"},
                            "sampling": {"tests": {"status": "pass", "passed": 3, "failed": 0, "skipped": 0},
                                         "memcheck": "pass", "racecheck": "fail (2 errors)"}}}
    md = gpu_check.markdown(summary)
    assert "| attention | pass | 9 | 0 | 1 | pass | - |" in md
    assert "| sampling | pass | 3 | 0 | 0 | pass | fail (2 errors) |" in md and "copy_GBps" in md
    assert gpu_check.family_verdict(summary["families"]["attention"]) == "pass"
    assert gpu_check.family_verdict(summary["families"]["sampling"]) == "FAIL"
    assert gpu_check.family_verdict({"tests": {"status": "timeout"}}) == "FAIL"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU path")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path, capsys):
    out = tmp_path / "gpu"
    assert gpu_check.main([str(out)]) == 0
    assert "no GPU here" in capsys.readouterr().out
    assert not out.exists()
