"""pytest plugin of the dry run: collect the tests phase's selection as a GPU machine would, without running it.

``pytest -p benchmarks.gpu_check.collect --collect-only FILES`` with ``GPU_CHECK_STEPS`` (JSON: step name ->
[files, -k expression]) and ``GPU_CHECK_COLLECTED`` (a path) in the environment. Loaded before the tests' conftest,
it answers True to ``torch.cuda.is_available()``, so the test modules build the parameters they build on a GPU
(the ``cuda-triton`` cases; ``cuda-cuda`` ones need the CUDA build of the extension, which only the GPU has). Then
it applies each step's -k expression with pytest's own keyword matching (what ``-k`` does) and writes the number of
tests each step selects, and the collection errors of its files, to ``GPU_CHECK_COLLECTED``.
"""

from __future__ import annotations

import json
import os

import torch

torch.cuda.is_available = lambda: True  # before conftest.py reads it


def pytest_collection_modifyitems(config, items):
    from _pytest.mark import KeywordMatcher
    from _pytest.mark.expression import Expression

    steps = json.loads(os.environ["GPU_CHECK_STEPS"])
    selected = {}
    for name, (files, keyword) in steps.items():
        expression = Expression.compile(keyword)
        selected[name] = sum(1 for item in items if item.nodeid.split("::")[0] in files
                             and expression.evaluate(KeywordMatcher.from_item(item)))
    config._gpu_check_selected = selected


def pytest_collectreport(report):
    if report.failed:
        _ERRORS.append({"nodeid": report.nodeid, "error": str(report.longrepr)[-2000:]})


_ERRORS: list[dict] = []


def pytest_sessionfinish(session):
    with open(os.environ["GPU_CHECK_COLLECTED"], "w") as f:
        json.dump({"selected": getattr(session.config, "_gpu_check_selected", {}), "errors": _ERRORS}, f, indent=1)
