"""benchmarks.profile_replaced: it names the ops a drop-in runs beyond its peer's, and it runs end to end."""

import torch

from benchmarks import harness, profile_replaced


def test_excess_ops_lists_only_what_genfast_adds_largest_first():
    ours = {"aten::sum": 0.15, "aten::mm": 1.0, "aten::ne": 0.03, "aten::tiny": 0.001}
    theirs = {"aten::mm": 0.999, "aten::ne": 0.0}
    assert profile_replaced.excess_ops(ours, theirs) == [("aten::sum", 0.15, 0.0), ("aten::ne", 0.03, 0.0)]


def test_a_row_with_an_extra_pass_shows_that_pass():
    # The extra pass reads 4 MiB; the shared work is small, so its profiler jitter stays far below that pass.
    x, y = torch.randn(1024, 1024), torch.randn(16, 16)
    case = harness.ReplacedCase("test", "doubled with a check", "1024x1024", "doubled",
                                lambda: (lambda: (bool(torch.isnan(x.sum())), y * 2), lambda: y * 2))
    row = profile_replaced.profile_row(case)
    assert row["excess"][0][0] == "aten::sum"
    line = profile_replaced.markdown([row], {"device": "cpu", "commit": "abc", "date": "2026"})[-1]
    assert "`aten::sum`" in line and "doubled with a check" in line


def test_main_writes_the_family_profile(tmp_path, capsys):
    assert profile_replaced.main(["--family", "random", "--device", "cpu", "--out", str(tmp_path)]) == 0
    written = list(tmp_path.glob("*.md"))
    assert len(written) == 1
    text = written[0].read_text()
    assert "genfast.ops.philox_noise(normal=True)" in text and "genfast::philox_noise" in text
