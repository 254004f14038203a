"""benchmarks/report.py and the result files of benchmarks/run.py, on small fake results (no timing of genfast)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from benchmarks import harness, report, run


def _r(family, op, case, provider, ms):
    return {"family": family, "op": op, "case": case, "provider": provider, "ms": ms, "ms_p20": ms, "ms_p80": ms,
            "TFLOPs": None, "GBps": None, "peak_mem_MB": None}


DATA = {
    "device": "CPU test", "torch": "x", "triton": "y", "cuda": None, "commit": "abc1234",
    "date": "2026-11-29T00:00:00Z", "ceilings": {"copy_GBps": 10.0},
    "results": [
        _r("attention", "attention_fwd", "d64", "genfast-auto", 1.0),
        _r("attention", "attention_fwd", "d64", "genfast-triton", 0.5),  # not the default call: not compared
        _r("attention", "attention_fwd", "d64", "torch-sdpa", 2.0),
        _r("attention", "attention_fwd", "d64", "reference", 4.0),
        _r("attention", "attention_decode", "B1", "genfast-auto", 4.0),
        _r("attention", "attention_decode", "B1", "torch-sdpa", 1.0),
        _r("sampling", "sample_tokens", "greedy", "genfast-cpu", 1.0),  # no genfast-auto: each backend
        _r("sampling", "sample_tokens", "greedy", "reference", 0.97),
        _r("latent", "reparameterize", "n", "reference", 1.0),  # no genfast provider at all
        _r("latent", "reparameterize", "n", "torch-eager", 1.0),
    ],
}


def test_comparisons_use_the_default_call_and_peer_over_genfast():
    comps = {(c["op"], c["genfast"], c["peer"]): c["speedup"] for c in report.comparisons(DATA["results"])}
    assert comps == {
        ("attention_fwd", "genfast-auto", "torch-sdpa"): 2.0,
        ("attention_fwd", "genfast-auto", "reference"): 4.0,
        ("attention_decode", "genfast-auto", "torch-sdpa"): 0.25,
        ("sample_tokens", "genfast-cpu", "reference"): pytest.approx(0.97),
    }


def test_summary_geomean_and_losses():
    comps = report.comparisons(DATA["results"])
    rows = {(s["family"], s["peer"]): s for s in report.summary(comps)}
    sdpa = rows[("attention", "torch-sdpa")]
    assert sdpa["cases"] == 2 and sdpa["geomean"] == pytest.approx(math.sqrt(2.0 * 0.25))
    assert (sdpa["min"], sdpa["max"]) == (0.25, 2.0)
    lost = report.losses(comps)
    assert [(c["op"], round(c["speedup"], 2)) for c in lost] == [("attention_decode", 0.25), ("sample_tokens", 0.97)]
    assert [c["op"] for c in report.losses(comps, 0.05)] == ["attention_decode"]


def test_markdown_has_the_summary_on_top_and_a_section_per_family():
    md = report.markdown(DATA)
    assert md.index("## Summary") < md.index("## attention") < md.index("## latent") < md.index("## sampling")
    assert "### Losses: 2 comparison(s)" in md
    assert "attention `attention_decode` [B1]: auto at 0.25x of torch-sdpa" in md
    assert "| attention | auto | torch-sdpa | 2 | 0.71x | 0.25x | 2.00x |" in md
    assert "(no genfast provider ran on this device" in md.split("## latent")[1].split("##")[0]
    assert "![attention](cpu-test-20261129-abc1234-attention.png)" in md


def test_write_makes_one_figure_per_family_with_comparisons(tmp_path):
    path = tmp_path / "cpu-test-20261129-abc1234.json"
    path.write_text(json.dumps(DATA))
    written = report.write(str(path))
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["cpu-test-20261129-abc1234-attention.png", "cpu-test-20261129-abc1234-sampling.png",
                     "cpu-test-20261129-abc1234.md"]
    for name in names[:2]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not report.figure(DATA, ["latent"], str(tmp_path / "empty.png"))  # nothing to draw: no file
    assert not (tmp_path / "empty.png").exists()


def test_axis_ticks_are_symmetric_about_one():
    for limit in (1.5, 3.2, 10, 56):
        ticks = report._ticks(limit)
        assert 1.0 in ticks
        assert sorted(round(1 / t, 6) for t in ticks) == sorted(round(t, 6) for t in ticks)
        assert max(ticks) <= limit * 1.001


def test_readme_block_is_rewritten_in_place(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold table\n{report.README_END}\noutro\n")
    results = tmp_path / "r.json"
    results.write_text(json.dumps({**DATA, "duration_s": 1260}))
    report.update_readme({**DATA, "duration_s": 1260}, str(results), str(readme))
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("\noutro\n") and "old table" not in text
    assert "the whole `make bench` run took 21 min" in text
    assert "| attention | auto | torch-sdpa | 2 | 0.71x | 0.25x – 2.00x |" in text
    assert "- attention `attention_decode` [B1]: auto at 0.25x of torch-sdpa" in text  # a loss beyond the margin
    assert "and 1 more within 3%" in text  # sample_tokens at 0.97x
    report.update_readme({**DATA, "duration_s": 1260}, str(results), str(readme))
    assert readme.read_text() == text  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="bench-table"):
        report.update_readme(DATA, str(results), str(readme))


def test_readme_block_keeps_the_fast_options_apart():
    """A family timed with a default backend and a fast option gets one row per genfast provider, each named."""
    fast = _r("sampling", "sample_tokens", "greedy", "genfast-cpu-validate-off", 0.5)
    text = report.readme_block({**DATA, "results": DATA["results"] + [fast]}, "r.json")
    assert "| sampling | cpu | reference | 1 | 0.97x | 0.97x – 0.97x |" in text
    assert "| sampling | cpu-validate-off | reference | 1 | 1.94x | 1.94x – 1.94x |" in text


def test_latest_results_by_date_ignores_compile_reports(tmp_path):
    for name, date in (("a.json", "2026-11-22T00:00:00Z"), ("b.json", "2026-11-28T00:00:00Z")):
        (tmp_path / name).write_text(json.dumps({**DATA, "date": date}))
    (tmp_path / "compile-sm90a-triton3.6.0.json").write_text(json.dumps({"date": "2099-01-01", "rows": []}))
    assert os.path.basename(report.latest_results(str(tmp_path))) == "b.json"
    with pytest.raises(FileNotFoundError):
        report.latest_results(str(tmp_path / "none"))


def test_run_writes_local_results_unless_published(tmp_path, monkeypatch):
    x = torch.ones(8)
    cases = [harness.BenchCase("toy", "add", "n8", provider, lambda: (lambda: x + 1), bytes=64.0)
             for provider in ("genfast-cpu", "torch-eager")]
    monkeypatch.setattr(run, "collect_cases", lambda *a, **k: cases)
    monkeypatch.setattr(run, "collect_replaced", lambda *a, **k: [])
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(harness, "ceilings", lambda device: {"copy_GBps": 1.0})
    assert run.main(["--quick", "--device", "cpu"]) == 0
    (local,) = [p for p in os.listdir(tmp_path / "local") if p.endswith(".json")]
    data = json.loads((tmp_path / "local" / local).read_text())
    assert data["duration_s"] >= 0 and {r["provider"] for r in data["results"]} == {"genfast-cpu", "torch-eager"}
    assert os.path.exists(tmp_path / "local" / local.replace(".json", ".md"))
    assert os.path.exists(tmp_path / "local" / local.replace(".json", "-toy.png"))
    assert run.main(["--quick", "--device", "cpu", "--publish"]) == 0
    assert any(p.endswith(".json") for p in os.listdir(tmp_path))


def test_one_figure_for_all_families(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(DATA))
    written = report.write(str(path), one_figure=True)
    assert sorted(os.path.basename(p) for p in written) == ["bench.md", "bench.png"]
    assert "![attention](bench.png)" in (tmp_path / "bench.md").read_text()


def test_compute_bound_rows_read_against_this_runs_matmul():
    data = dict(DATA, ceilings={"copy_GBps": 10.0, "bf16_matmul_TFLOPs": 800.0},
                results=[dict(_r("attention", "attention_fwd", "d128", "genfast-auto", 1.0), TFLOPs=560.0),
                         _r("attention", "attention_fwd", "d128", "torch-sdpa", 2.0)])
    rows = [line for line in report.markdown(data).splitlines() if line.startswith("| attention_fwd")]
    assert rows[0].endswith("| 560.0 | 70% |") and rows[1].endswith("|  |  |")


def _swap(case, ratio, reps=21):
    return {"family": "attention", "drop_in": "genfast.ops.attention", "case": case,
            "before": "F.scaled_dot_product_attention", "genfast_ms": 1.0, "before_ms": ratio, "ratio": ratio,
            "ratio_p20": ratio, "ratio_p80": ratio, "reps": reps, "calls_per_sample": 1}


def test_measure_replaced_alternates_every_repetition_and_takes_the_median_ratio(monkeypatch):
    """A fake clock: genfast's call takes 1 ms, the user's 2 ms, except one slow outlier repetition."""
    clock, log = [0.0], []
    monkeypatch.setattr(harness.time, "perf_counter", lambda: clock[0])

    def call(name, ms):
        def fn():
            log.append(name)
            clock[0] += (ms * 50 if len(log) == 40 else ms) / 1e3  # one repetition hit by the machine's noise
        return fn

    swap = harness.ReplacedCase("toy", "genfast.toy", "n8", "torch.toy", lambda: (call("g", 1.0), call("t", 2.0)))
    row = harness.measure_replaced(swap, torch.device("cpu"), warmup=1, min_sample_ms=0.0)
    assert row["reps"] >= 20 and row["reps"] == harness.REPLACED_REPS
    assert row["ratio"] == pytest.approx(2.0) and row["genfast_ms"] == pytest.approx(1.0)
    timed = log[4:]  # after the warm-up pair and the one-call estimates
    pairs = [timed[i:i + 2] for i in range(0, len(timed), 2)]
    assert pairs == [["g", "t"] if i % 2 == 0 else ["t", "g"] for i in range(row["reps"])]


def test_replaced_table_flags_rows_below_the_margin_as_losses():
    data = {**DATA, "replaced": [_swap("fp32 N1024", 0.96), _swap("fp32 N256", 0.975), _swap("bf16", 1.3)]}
    md = report.markdown(data)
    table = md.split("Replaced:")[1]
    loss = [line for line in table.splitlines() if "**loss**" in line]
    assert len(loss) == 1 and "fp32 N1024" in loss[0] and "0.96x" in loss[0]
    assert report.LOSS_MARGIN == pytest.approx(0.03) and "below 0.97x is flagged" in table


def test_combined_runs_name_a_loss_in_one_run_only_as_noise():
    first = {**DATA, "replaced": [_swap("a", 0.90), _swap("b", 0.95), _swap("c", 1.10)]}
    second = {**DATA, "commit": "def5678", "replaced": [_swap("a", 0.92), _swap("b", 1.05), _swap("c", 1.00)],
              "results": [dict(r, ms=3 * r["ms"]) for r in DATA["results"]]}
    merged = report.combine([first, second])
    rows = {r["case"]: r for r in merged["replaced"]}
    assert rows["a"]["ratio"] == pytest.approx(0.91) and report.replaced_verdict(rows["a"]) == "**loss**"
    assert report.replaced_verdict(rows["b"]) == "noise (below in 1 of 2 runs)"
    assert report.replaced_verdict(rows["c"]) == ""
    ms = {(r["op"], r["provider"]): r["ms"] for r in merged["results"]}
    assert ms[("attention_fwd", "genfast-auto")] == pytest.approx(2.0)  # the median of 1 and 3
    block = report.readme_block(merged, "r.json")
    assert "median of the runs abc1234" in block and "def5678" in block
    assert "(runs: 0.90x, 0.92x)" in block and block.count("**loss**") == 1


def test_run_replaced_times_only_the_replaced_rows(tmp_path, monkeypatch):
    x = torch.ones(8)
    swap = harness.ReplacedCase("toy", "genfast.toy", "n8", "torch.toy", lambda: ((lambda: x + 1), (lambda: x * 2)))
    monkeypatch.setattr(run, "collect_cases", lambda *a, **k: pytest.fail("--replaced times no other case"))
    monkeypatch.setattr(run, "collect_replaced", lambda *a, **k: [swap])
    monkeypatch.setattr(harness, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(harness, "ceilings", lambda device: {"copy_GBps": 1.0})
    assert run.main(["--replaced", "--device", "cpu"]) == 0
    (local,) = [p for p in os.listdir(tmp_path / "local") if p.endswith(".json")]
    data = json.loads((tmp_path / "local" / local).read_text())
    assert data["results"] == [] and [r["drop_in"] for r in data["replaced"]] == ["genfast.toy"]
    assert "Replaced:" in (tmp_path / "local" / local.replace(".json", ".md")).read_text()
    with pytest.raises(FileNotFoundError):  # a replaced-only run does not stand for the suite
        report.latest_results(str(tmp_path / "local"))


def test_latest_results_does_not_look_into_history(tmp_path):
    (tmp_path / "history").mkdir()
    (tmp_path / "a.json").write_text(json.dumps({**DATA, "date": "2026-11-22T00:00:00Z"}))
    (tmp_path / "history" / "newer.json").write_text(json.dumps({**DATA, "date": "2026-12-01T00:00:00Z"}))
    assert os.path.basename(report.latest_results(str(tmp_path))) == "a.json"


def test_committed_results_keep_one_suite_per_device_at_the_top_level():
    """Issue 27: benchmarks/results/ held 51 files from 4 runs. The newest runs of each device stay at the top level
    (its index, README.md, names them); older runs live in history/; the README's headline comes from the current
    ones. Issue 26: the current CPU suite is two full runs of one commit, and the headline their per-row median."""
    runs = {}
    for name in os.listdir(report.RESULTS_DIR):
        if name.endswith(".json") and not name.startswith("compile-"):
            data = report.load(os.path.join(report.RESULTS_DIR, name))
            runs.setdefault(data["device"], set()).add(data["commit"])
    assert runs and all(len(commits) == 1 for commits in runs.values()), runs
    current = [os.path.basename(p) for p in report.current_runs()]
    assert current[-1] == os.path.basename(report.latest_results())
    index = open(os.path.join(report.RESULTS_DIR, "README.md")).read()
    commit = report.load(report.latest_results())["commit"]
    assert all(name.startswith(report.stem_name(report.load(report.latest_results()))) for name in current)
    assert report.stem_name(report.load(report.latest_results())) in index and commit in index
    readme = open(report.README).read()
    assert f"benchmarks/results/{current[-1]}" in readme
    if len(current) > 1:
        assert "per-row median of the runs" in readme
    for name in os.listdir(os.path.join(report.RESULTS_DIR, "history")):
        assert not name.startswith("compile-")  # the compile gate rewrites those in place, at the top level
