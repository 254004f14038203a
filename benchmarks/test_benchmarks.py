"""The benchmark suite under pytest-benchmark: `pytest benchmarks --benchmark-only`.

The same cases as `make bench` (benchmarks/run.py), one test per (op, case, provider).
"""

import pytest
import torch

from benchmarks import run

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = run.collect_cases(DEVICE, None, quick=False)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_benchmark(benchmark, case):
    fn = case.setup()
    if DEVICE.type == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    benchmark.group = f"{case.op}[{case.case}]"
    benchmark(timed)
