"""The compile gate's CPU-side logic: checks, report files, log parsing, and what it captures from the launchers.

The gate itself (every kernel compiled for sm_90a and sm_80, under both Tritons) is `make compile-gate`, which
`make test` runs before these tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from benchmarks.compile import cuda_build, report
from benchmarks.compile.fake_cuda import Pointer, cuda_on_meta
from benchmarks.compile.triton_build import (
    ptx_numbers,
    ptxas_numbers,
    ptxas_warnings,
    wgmma_in_flight,
    wgmma_serialized,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What ptxas and cuobjdump printed for the Hopper attention forward (bf16 d128, M128 N64, 8 warps, 2 stages, sm_90a),
# captured by the gate: its form before issue 25 (ptxas serialized its wgmma) and the tile-pair form after.
SAMPLES = os.path.join(ROOT, "tests", "data", "compile_gate")


def _sample(name: str) -> str:
    with open(os.path.join(SAMPLES, name)) as f:
        return f.read()


def _row(**measured):
    base = {"compiled": True, "regs": 128, "spill_bytes": 0, "shared_bytes": 1024, "wgmma": 4, "wgmma_async": True,
            "wgmma_serialized": False, "ptxas_warnings": [], "mma_sync": 0, "tma": 0}
    return report.row("attention", "_fwd_kernel", "triton", "bf16 d128: BLOCK_M=128", {**base, **measured})


def test_a_clean_row_passes():
    assert report.failures([_row()], "90a") == []


@pytest.mark.parametrize("measured, arch, words", [
    ({"compiled": False, "error": "CompilationError: boom"}, "90a", ["does not compile", "CompilationError: boom"]),
    ({"shared_bytes": 232449}, "90a", ["232449 B of shared memory", "232448 B limit"]),
    ({"shared_bytes": 166913}, "80", ["166913 B of shared memory", "166912 B limit"]),
    ({"spill_bytes": 470, "regs": 255}, "80", ["spills 470 B", "255 registers"]),
    ({"wgmma": 0, "mma_sync": 64}, "90a", ["64 mma.sync, no wgmma"]),
    ({"wgmma_serialized": True, "wgmma_async": False, "ptxas_warnings": ["C7514: Potential Performance Loss: ..."]},
     "90a", ["ptxas serializes its wgmma (C7514)"]),
])
def test_each_check_fails_with_kernel_config_and_number(measured, arch, words):
    (message,) = report.failures([_row(**measured)], arch)
    assert "_fwd_kernel" in message and "BLOCK_M=128" in message and f"sm_{arch}" in message
    for word in words:
        assert word in message


def test_limits_and_wgmma_rule_are_per_arch_and_family():
    assert report.failures([_row(shared_bytes=232448)], "90a") == []  # exactly the limit fits
    assert report.failures([_row(shared_bytes=200000)], "80")  # fits Hopper, not Ampere
    assert report.failures([_row(wgmma=0, mma_sync=64)], "80") == []  # no wgmma on Ampere
    sampling = report.row("sampling", "_sampling_kernel", "triton", "", {**_row(), "wgmma": 0, "mma_sync": 8})
    assert report.failures([sampling], "90a") == []
    fp32 = _row(wgmma=0, mma_sync=0)  # an fp32 "ieee" dot: no tensor cores at all is by design
    assert report.failures([fp32], "90a") == []


@pytest.mark.parametrize("tma, in_flight", [(4, True), (4, False), (0, True)])
def test_tma_kernels_need_tma_loads_on_hopper(tma, in_flight):
    """A *_tma_kernel without TMA loads fails; one without wgmma in flight passes (the forward's d256 goes one tile
    at a time) as long as ptxas serialized nothing."""
    tma_row = report.row("attention", "_fwd_tma_kernel", "triton", "bf16 d128: BLOCK_M=128",
                         {**_row(), "tma": tma, "wgmma_async": in_flight})
    messages = report.failures([tma_row], "90a")
    if tma:
        assert messages == []
    else:
        (message,) = messages
        assert "_fwd_tma_kernel" in message and "BLOCK_M=128" in message and "expected TMA loads" in message
    # Only kernels named *_tma_kernel, only on sm_90a, only Triton's.
    assert report.failures([{**tma_row, "kernel": "_fwd_kernel"}], "90a") == []
    assert report.failures([tma_row], "80") == []
    assert report.failures([{**tma_row, "source": "cuda"}], "90a") == []


def test_report_round_trip_schema_and_no_churn(tmp_path):
    rows = [_row(), _row(compiled=False, error="x", regs=None, spill_bytes=None, shared_bytes=None)]
    meta = {"arch": "90a", "triton": "9.9.9", "nvcc": "13.0.88", "commit": "abc1234", "date": "2026-11-29T00:00:00Z"}
    stem = report.write(str(tmp_path), meta, rows)
    assert stem.endswith("compile-sm90a-triton9.9.9")
    data = report.read(stem + ".json")
    assert list(data) == ["arch", "triton", "nvcc", "commit", "date", "rows"]
    assert [list(r) for r in data["rows"]] == [list(report.FIELDS)] * 2  # no extra keys (the error stays out)
    md = open(stem + ".md").read()
    assert "1 failing check" in md and "does not compile: x" in md and "| attention | _fwd_kernel |" in md
    # Same rows, another date and commit: the files are left as they are.
    report.write(str(tmp_path), {**meta, "date": "2027-01-01T00:00:00Z", "commit": "def5678"}, rows)
    assert report.read(stem + ".json")["commit"] == "abc1234"
    report.write(str(tmp_path), {**meta, "commit": "def5678"}, rows[:1])
    again = report.read(stem + ".json")
    assert again["commit"] == "def5678" and len(again["rows"]) == 1
    assert "All checks pass" in open(stem + ".md").read()


def test_read_rejects_a_foreign_file(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"arch": "90a", "rows": []}))
    with pytest.raises(ValueError, match="missing triton"):
        report.read(str(path))
    path.write_text(json.dumps({"arch": "90a", "triton": "1", "nvcc": None, "commit": "c", "date": "d",
                                "rows": [{"family": "x"}]}))
    with pytest.raises(ValueError, match="row 0"):
        report.read(str(path))


def test_ptxas_log_of_a_triton_kernel():
    log = textwrap.dedent("""\
        ptxas info    : 0 bytes gmem
        ptxas info    : Compiling entry function '_fwd_kernel' for 'sm_90a'
        ptxas info    : Function properties for _fwd_kernel
            8 bytes stack frame, 472 bytes spill stores, 318 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 8 bytes smem, 400 bytes cmem[0]
        """)
    assert ptxas_numbers(log) == {"regs": 255, "spill_bytes": 790, "static_shared": 8}


def test_ptx_instruction_counts():
    ptx = textwrap.dedent("""\
        wgmma.fence.sync.aligned;
        wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1}, %rd1, %rd2, 1, 1, 1, 0, 1;
        wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%r1}, %rd3, %rd4, 1, 1, 1, 0, 1;
        wgmma.commit_group.sync.aligned;
        wgmma.wait_group.sync.aligned 0;
        mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
        cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1, {%r2, %r3}], [%r4];
        """)
    assert ptx_numbers(ptx) == {"wgmma": 2, "mma_sync": 1, "tma": 1}


@pytest.mark.parametrize("version", ["3.9", "3.6"])
def test_ptxas_serialization_advisory_is_read(version):
    """Triton 3.9 runs ptxas-blackwell, 3.6 ptxas: either prefix, the C7514 line becomes one warning, and it means
    serialized wgmma; the log's other numbers read as before."""
    log = _sample(f"ptxas_fwd_tma_serialized_triton{version}.log")
    (warning,) = ptxas_warnings(log)
    assert warning.startswith("C7514: Potential Performance Loss: wgmma.mma_async instructions are serialized")
    assert "reading accumulator registers of a wgmma" in warning  # ptxas's double space collapsed
    assert wgmma_serialized([warning])
    assert ptxas_numbers(log)["spill_bytes"] == 0 and ptxas_numbers(log)["regs"] in (214, 208)
    clean = _sample("ptxas_fwd_tma_pairs_triton3.9.log")
    assert ptxas_warnings(clean) == [] and not wgmma_serialized([])
    assert not wgmma_serialized(["C7509: some other advisory"])


def test_sass_shows_whether_wgmma_stay_in_flight():
    """Before: every HGMMA of the loop closes its own group and is waited for (DEPBAR gsb0, 0x0) before anything
    else: not in flight. After: the next pair's score HGMMAs run while the softmax's MUFU.EX2 issue."""
    serialized = _sample("fwd_tma_serialized_d128_triton3.9.sass")
    paired = _sample("fwd_tma_pairs_d128_triton3.9.sass")
    assert "HGMMA" in serialized and "WARPGROUP.DEPBAR.LE gsb0, 0x0" in serialized
    assert not wgmma_in_flight(serialized)
    assert wgmma_in_flight(paired)
    # The same text cut right before its first MUFU: nothing but the row max runs beside the HGMMA yet.
    cut = paired[:paired.index("MUFU")]
    assert not wgmma_in_flight(cut.rsplit("\n", 1)[0])
    # A pipelined matmul waits with N > 0 groups left in flight (the form of a K loop's wgmma).
    pipelined = ("        /*0100*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;"
                 "                                      /* 0x000080000000791a */\n")
    assert wgmma_in_flight(pipelined)
    assert cuda_build.sass_functions(paired).keys() == {"_fwd_tma_kernel"}


def test_nvcc_log_per_kernel_and_ptx_entries():
    log = textwrap.dedent("""\
        ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
        ptxas info    : Function properties for _Z3fooPf
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 360 bytes cmem[0]
        ptxas info    : Compiling entry function '_Z3barPf' for 'sm_80'
        ptxas info    : Function properties for _Z3barPf
            16 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads
        ptxas info    : Used 255 registers, used 0 barriers, 360 bytes cmem[0]
        """)
    assert cuda_build.parse_ptxas(log) == {
        "_Z3fooPf": {"regs": 40, "spill_bytes": 0, "shared_bytes": 4096, "ptxas_warnings": []},
        "_Z3barPf": {"regs": 255, "spill_bytes": 24, "shared_bytes": 0, "ptxas_warnings": []},
    }
    # An advisory names its function (ptxas prints it before that function's entry line).
    serialized = _sample("ptxas_fwd_tma_serialized_triton3.6.log")
    parsed = cuda_build.parse_ptxas(serialized + log)
    assert parsed["_fwd_tma_kernel"]["ptxas_warnings"][0].startswith("C7514: ")
    assert parsed["_Z3fooPf"]["ptxas_warnings"] == []
    ptx = ".visible .entry _Z3fooPf(\n mma.sync.aligned.m16n8k16 x;\n}\n.visible .entry _Z3barPf(\n ret;\n}\n"
    entries = cuda_build.ptx_entries(ptx)
    assert set(entries) == {"_Z3fooPf", "_Z3barPf"} and "mma.sync" in entries["_Z3fooPf"]
    assert "mma.sync" not in entries["_Z3barPf"]


def test_cuda_kernel_names_and_families():
    name = "void genfast::cuda::(anonymous namespace)::decode_split_kernel<__nv_bfloat16, 128>(float const*, int)"
    assert cuda_build.short_kernel(name) == ("decode_split_kernel", "__nv_bfloat16, 128")
    assert cuda_build.family_of("csrc/cuda/attention.cu", "decode_split_kernel") == "attention_decode"
    assert cuda_build.family_of("csrc/cuda/attention.cu", "attention_fwd_kernel") == "attention"
    assert cuda_build.family_of("csrc/cuda/sampling.cu", "sample_kernel") == "sampling"


def test_cuda_on_meta_tensors_report_cuda_and_allocate_nothing():
    is_available = torch.cuda.is_available
    with cuda_on_meta("80"):
        x = torch.empty(4, 8, device="cuda", dtype=torch.bfloat16)
        y = x.t().contiguous()[1:]
        assert x.device.type == "cuda" and x.is_cuda and y.device == torch.device("cuda", 0)
        assert x.is_meta and y.is_meta
        assert torch.cuda.is_available() and torch.cuda.get_device_capability() == (8, 0)
        assert torch.cuda.get_device_properties(0).multi_processor_count == 108
    assert torch.cuda.is_available is is_available
    assert Pointer(y).data_ptr() % 16 == 8  # one row of 4 bf16 in: 8 bytes past an aligned base
    assert Pointer(x).data_ptr() % 16 == 0 and Pointer(y).dtype == torch.bfloat16


def test_capture_covers_every_family_and_kernel():
    """In a subprocess (compiled Triton, not the interpreter the test suite runs): every case calls its
    launcher, every *_kernel of genfast/kernels is launched, and autotuned launches expand into their
    configs, each specialized by the JIT's binder for both targets."""
    script = textwrap.dedent("""\
        import collections, json
        from benchmarks.compile import capture, cases, triton_build
        from benchmarks.compile.__main__ import _uncovered
        from benchmarks.compile.fake_cuda import cuda_on_meta
        modules = cases.kernel_modules()
        families, configs, launched = set(), collections.Counter(), set()
        for case in cases.cases():
            with cuda_on_meta("90a"), capture.recording() as launches:
                case.run(modules)
            assert launches, case.name
            families.add(case.family)
            for launch in launches:
                launched.add(launch.kernel)
                configs[launch.kernel] += 1
        first = launches[0]
        keys = {triton_build.cache_key(first, arch) for arch in ("90a", "80")}
        triton_build._MEASURING_CODE = "another way of reading the compiler's output"
        remeasured = triton_build.cache_key(first, "90a") not in keys
        print(json.dumps({"families": sorted(families), "uncovered": _uncovered(modules, launched),
                          "fwd_configs": configs["_fwd_kernel"] + configs["_fwd_tma_kernel"], "keys": len(keys),
                          "remeasured": remeasured}))
        """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    from benchmarks.compile.cases import FAMILIES

    assert result["families"] == sorted(FAMILIES)
    assert result["uncovered"] == []
    assert result["fwd_configs"] > 3  # the forward's autotuner configs (pointer and TMA kernels), not one
    assert result["keys"] == 2  # a different specialization per target
    assert result["remeasured"]  # cached rows are not reused once the gate measures differently
