"""The replaced rows compare like with like: genfast's call and the call it replaces compute the same thing.

Each quick row of benchmarks/bench_attention.py and bench_integrations.py is run once on each side and the results
compared (fp32, so only summation order differs). A row whose two sides did different work would time nothing.
"""

import pytest
import torch

from benchmarks import bench_attention, bench_integrations

DEVICE = torch.device("cpu")


def _rows():
    rows = bench_attention.replaced(DEVICE, quick=True)
    try:
        rows += bench_integrations.replaced(DEVICE, quick=True)
    except ImportError:  # transformers or diffusers missing: their rows are not built
        pass
    return rows


def _flat(result):
    return list(result) if isinstance(result, (tuple, list)) else [result]


@pytest.mark.parametrize("row", _rows(), ids=lambda r: r.name)
def test_both_sides_compute_the_same(row):
    ours, theirs = row.setup()
    got, want = _flat(ours()), _flat(theirs())
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g.float(), w.float(), rtol=1e-4, atol=1e-4)


def test_every_family_row_is_named():
    names = {r.drop_in for r in _rows()}
    assert {"genfast.ops.attention", "genfast.ops.attention_varlen"} <= names
