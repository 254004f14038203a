"""Launch-level properties of the attention kernels (genfast/kernels/attention*.py, csrc/cuda/attention.cu) that
a CPU can show: bucketed autotune keys and the no-benchmark heuristic, the config rule (no spills, no shared
memory overflow), int64 offsets for tensors past 2^31 elements, the flat decode grid, and what nvcc makes of the
CUDA decode kernel. Numerics against the spec live in test_attention*.py.
"""

import os
import re
import shutil
import subprocess

import pytest
import torch
import triton

from genfast.kernels import _attention_configs as configs
from genfast.kernels import attention as kernels
from genfast.kernels import attention_decode as decode_kernels
from genfast.ops import attention_ref
from genfast.ops._attention_common import window_bounds

TUNED = {"fwd": kernels._fwd_kernel, "dkdv": kernels._bwd_dkdv_kernel, "dq": kernels._bwd_dq_kernel}
HOPPER_SMEM, A100_SMEM = 232448, 166912


# ------------------------------------------------------------------------------------------ autotune keys
def test_lengths_enter_the_autotune_key_bucketed():
    for kernel in TUNED.values():
        assert "q_bucket" in kernel.keys and "k_bucket" in kernel.keys
        assert not {"Nq", "Nk", "TotalQ", "TotalK"} & set(kernel.keys)
    assert [configs.length_bucket(n) for n in (1, 17, 64, 65, 1000, 1024, 1025)] == [64, 64, 64, 128, 1024, 1024,
                                                                                      2048]


def _two_config_autotuner(monkeypatch, kernel):
    """Give ``kernel`` two configs and a counting benchmark (the interpreter has one config and never tunes)."""
    calls = []
    configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=s) for s in (1, 2)]
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    monkeypatch.setattr(kernel, "_bench", lambda *args, config, **meta: calls.append(config) or 1.0)
    return calls


def _fwd(nq, nk, **kw):
    gen = torch.Generator().manual_seed(nq * 1000 + nk)
    q = torch.randn(1, 2, nq, 16, generator=gen)
    k = torch.randn(1, 2, nk, 16, generator=gen)
    v = torch.randn(1, 2, nk, 16, generator=gen)
    full = window_bounds(False, -1, -1, nq, nk)
    out, _ = kernels.attention_fwd(q, k, v, None, None, 0.0, 0.25, full, **kw)
    return out, attention_ref(q, k, v, scale=0.25)


def test_a_new_length_in_a_seen_bucket_does_not_retune(monkeypatch):
    calls = _two_config_autotuner(monkeypatch, kernels._fwd_kernel)
    monkeypatch.delenv("GENFAST_AUTOTUNE", raising=False)
    _fwd(17, 20)
    assert len(calls) == 2  # first key: both configs benchmarked
    _fwd(40, 33)  # same buckets (64, 64)
    assert len(calls) == 2 and len(kernels._fwd_kernel.cache) == 1
    _fwd(70, 20)  # q bucket 128: a new key
    assert len(calls) == 4 and len(kernels._fwd_kernel.cache) == 2


@pytest.mark.parametrize("how", ["env", "argument"])
def test_heuristic_config_needs_no_benchmark(monkeypatch, how):
    calls = _two_config_autotuner(monkeypatch, kernels._fwd_kernel)
    if how == "env":
        monkeypatch.setenv("GENFAST_AUTOTUNE", "0")
        assert not configs.autotune_enabled()
        out, ref = _fwd(23, 31)
    else:
        monkeypatch.delenv("GENFAST_AUTOTUNE", raising=False)
        out, ref = _fwd(23, 31, autotune=False)
    assert calls == [] and kernels._fwd_kernel.cache == {}
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_heuristic_backward_matches_reference(monkeypatch):
    monkeypatch.setenv("GENFAST_AUTOTUNE", "0")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 19, 16, generator=gen) for _ in range(3))
    causal = window_bounds(True, -1, -1, 19, 19)
    out, lse = kernels.attention_fwd(q, k, v, None, None, 0.0, 0.25, causal)
    g = torch.randn(out.shape, generator=gen)
    dq, dk, dv = kernels.attention_bwd(g, None, q, k, v, out, lse, None, None, 0.0, 0.25, causal)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    (attention_ref(*leaves, causal=True, scale=0.25) * g).sum().backward()
    for got, leaf in zip((dq, dk, dv), leaves):
        torch.testing.assert_close(got, leaf.grad, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ config rule
@pytest.mark.parametrize("kernel", list(TUNED))
@pytest.mark.parametrize("elem", [2, 4], ids=["16-bit", "fp32"])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("limit,capability", [(HOPPER_SMEM, (9, 0)), (A100_SMEM, (8, 0))], ids=["sm90", "sm80"])
def test_every_head_dim_keeps_a_config(kernel, elem, head_dim, limit, capability):
    candidates = configs._tuned_candidates(kernel)
    kept = [c for c in candidates
            if configs.config_fits(kernel, c[0], c[1], head_dim, c[2], c[3], elem, limit, capability)]
    assert kept, "no config fits"
    for m, n, warps, stages in kept:
        assert configs.shared_bytes(kernel, m, n, head_dim, stages, elem) <= limit


# Measured with Triton 3.9 for bf16 (ptxas -v / the compiled kernel's shared memory), causal GQA launches.
@pytest.mark.parametrize("arch,kernel,head_dim,config,why", [
    ("sm90", "dkdv", 128, (128, 64, 8, 3), "247,808 B of shared memory"),
    ("sm90", "fwd", 128, (128, 64, 4, 3), "spills 1.7 KB"),
    ("sm90", "fwd", 128, (128, 128, 4, 2), "spills 3.8 KB"),
    ("sm90", "fwd", 128, (128, 128, 8, 2), "spills 72 B"),
    ("sm90", "fwd", 128, (128, 64, 8, 3), "spills 32 B"),
    ("sm90", "fwd", 256, (64, 64, 8, 2), "spills 96 B"),
    ("sm90", "dq", 128, (128, 64, 4, 2), "spills ~2.2 KB"),
    ("sm90", "dq", 256, (64, 64, 8, 2), "spills 188 B"),
    ("sm90", "dkdv", 128, (64, 64, 4, 2), "4-warp dK/dV spills"),
    ("sm90", "dkdv", 128, (64, 64, 8, 2), "spills 152 B"),
    ("sm90", "dkdv", 256, (64, 32, 8, 1), "spills 448 B"),
    ("sm80", "fwd", 128, (128, 64, 8, 2), "spills 116 B"),
    ("sm80", "fwd", 128, (64, 64, 4, 2), "spills 32 B"),
    ("sm80", "fwd", 64, (128, 128, 8, 2), "spills 32 B"),
    ("sm80", "dkdv", 64, (64, 64, 8, 2), "spills 52 B"),
    ("sm80", "dq", 64, (64, 64, 8, 2), "spills 140 B"),
    ("sm80", "dq", 256, (64, 32, 8, 1), "spills 6.6 KB"),
    ("sm80", "dkdv", 64, (64, 32, 8, 1), "spills 8 B"),
    ("sm90", "dkdv", 128, (32, 32, 8, 1), "spills 84 B"),
    ("sm90", "fwd", 128, (32, 32, 4, 2), "lowers to mma.sync"),
    ("sm90", "fwd_tma", 128, (128, 128, 8, 2), "spills 1,028 B"),
    ("sm90", "fwd_tma", 128, (128, 64, 8, 3), "262 KB of shared memory: the tile pairs' four streamed loads"),
    ("sm90", "fwd_tma", 64, (64, 128, 4, 2), "spills 188 B"),
    ("sm90", "fwd_tma", 256, (128, 64, 8, 2), "spills 564 B"),
    ("sm90", "dkdv_dq", 64, (64, 128, 8, 2), "spills 432 B"),
    ("sm90", "dkdv_dq", 128, (64, 64, 8, 2), "spills 80 B"),
    ("sm90", "dkdv_dq", 256, (64, 64, 8, 2), "spills 1,020 B"),
    ("sm80", "dkdv_dq", 128, (64, 32, 8, 2), "spills 28 B"),
    ("sm80", "dkdv_dq", 256, (64, 32, 8, 2), "spills 1,368 B"),
])
def test_configs_measured_to_spill_or_overflow_are_pruned(arch, kernel, head_dim, config, why):
    m, n, warps, stages = config
    limit, capability = (HOPPER_SMEM, (9, 0)) if arch == "sm90" else (A100_SMEM, (8, 0))
    assert not configs.config_fits(kernel, m, n, head_dim, warps, stages, 2, limit, capability), why


# With a bool mask and dropout (bf16, d128), measured likewise.
@pytest.mark.parametrize("arch,kernel,config,why", [
    ("sm90", "fwd", (128, 64, 8, 2), "spills 2,816 B"),
    ("sm90", "fwd", (64, 32, 4, 2), "spills 20 B"),
    ("sm90", "fwd_tma", (128, 64, 8, 2), "spills 572 B with dropout alone"),
    ("sm90", "dkdv_dq", (128, 32, 8, 1), "spills 68 B"),
    ("sm90", "dkdv", (64, 32, 8, 1), "spills 276 B"),
    ("sm90", "dq", (64, 64, 8, 2), "spills 224 B"),
])
def test_configs_measured_to_spill_with_masks_and_dropout_are_pruned(arch, kernel, config, why):
    m, n, warps, stages = config
    limit, capability = (HOPPER_SMEM, (9, 0)) if arch == "sm90" else (A100_SMEM, (8, 0))
    assert not configs.config_fits(kernel, m, n, 128, warps, stages, 2, limit, capability, dropout=True,
                                   mask=kernel != "fwd_tma"), why


@pytest.mark.parametrize("head_dim,config", [(128, (32, 32, 4, 1)), (128, (64, 32, 8, 2)), (64, (64, 64, 8, 2))])
def test_fp32_takes_small_fma_tiles_only(head_dim, config):
    # fp32 dots run on the FMA units: on sm_90a 32x32 spills ~3 KB at d128, 64x32 8-warp ~4.8 KB, 64x64 at d64 1.6 KB.
    m, n, warps, stages = config
    assert not configs.config_fits("fwd", m, n, head_dim, warps, stages, 4, HOPPER_SMEM)
    assert configs.config_fits("fwd", 16, 16, head_dim, 4, 1, 4, HOPPER_SMEM)


def test_the_shared_memory_count_matches_the_measured_overflow():
    # ptxas/Triton on sm_90a: dK/dV d128, M128 N64, 3 stages, bf16 needs 247,808 B.
    assert abs(configs.shared_bytes("dkdv", 128, 64, 128, 3, 2) - 247808) <= 2048


# ------------------------------------------------------------------------------------------ int64 offsets
def _huge_rows(shape, row_stride, dtype):
    """A [B, H, N, D] view whose rows are ``row_stride`` elements apart in one storage of more than 2^31
    elements. Only the pages written are ever touched, so it costs a few MB of memory."""
    b, h, n, d = shape
    storage = torch.empty(row_stride * n + h * d, dtype=dtype)
    view = storage.as_strided(shape, (0 if b == 1 else row_stride * n, d, row_stride, 1))
    return view


def test_needs_int64_sees_the_largest_offset():
    assert not kernels.needs_int64(torch.empty(2, 3, 4))
    assert kernels.needs_int64(torch.empty_strided((2, 2), (2**31, 1), dtype=torch.uint8, device="meta"))
    assert not kernels.needs_int64(torch.empty_strided((2, 2), (2**31 - 2, 1), device="meta"))


def test_row_offsets_past_2_to_the_31_forward_and_backward():
    # q rows 2^27 elements apart: row 16 (the second tile) starts at element 2^31.
    nq, d = 17, 16
    q = _huge_rows((1, 2, nq, d), 2**27, torch.float16)
    gen = torch.Generator().manual_seed(0)
    small_q = torch.randn(1, 2, nq, d, generator=gen).half()
    q.copy_(small_q)
    k, v = (torch.randn(1, 2, 9, d, generator=gen).half() for _ in range(2))
    # A bool mask whose rows are 2^27 bytes apart as well: Nq x (row stride) passes 2^31.
    mask_store = torch.zeros(2**27 * nq + 9, dtype=torch.bool)
    rows = mask_store.as_strided((nq, 9), (2**27, 1))
    small_mask = torch.rand(nq, 9, generator=gen) > 0.3
    small_mask[:, 0] = True
    rows.copy_(small_mask)
    mask = rows.expand(1, 2, nq, 9)
    assert kernels.needs_int64(q) and kernels.needs_int64(mask)
    full = window_bounds(False, -1, -1, nq, 9)
    out, lse = kernels.attention_fwd(q, k, v, mask, None, 0.0, 0.25, full)
    ref, ref_lse = attention_ref(small_q.float(), k.float(), v.float(), attn_mask=small_mask, scale=0.25,
                                 return_lse=True)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, ref_lse, atol=2e-3, rtol=2e-3)
    g = torch.randn(out.shape, generator=gen).half()
    dq, dk, dv = kernels.attention_bwd(g, None, q, k, v, out, lse, mask, None, 0.0, 0.25, full)
    leaves = [t.float().requires_grad_(True) for t in (small_q, k, v)]
    (attention_ref(*leaves, attn_mask=small_mask, scale=0.25) * g.float()).sum().backward()
    for got, leaf in zip((dq, dk, dv), leaves):
        torch.testing.assert_close(got.float(), leaf.grad, atol=1e-2, rtol=1e-2)


def test_decode_query_rows_past_2_to_the_31():
    from genfast.ops.attention_decode import attention_decode_ref

    d = 16
    q = _huge_rows((1, 2, 17, d), 2**27, torch.float16)
    gen = torch.Generator().manual_seed(1)
    small_q = torch.randn(1, 2, 17, d, generator=gen).half()
    q.copy_(small_q)
    cache_k, cache_v = (torch.randn(1, 2, 40, d, generator=gen).half() for _ in range(2))
    lengths = torch.tensor([33], dtype=torch.int32)
    bounds = window_bounds(True, -1, -1, 17, 40)[:2]
    out, _ = decode_kernels.attention_decode(q, cache_k, cache_v, lengths, True, 0.25, *bounds, 2)
    want, _ = decode_kernels.attention_decode(small_q, cache_k, cache_v, lengths, True, 0.25, *bounds, 2)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    ref = attention_decode_ref(small_q.float(), cache_k.float(), cache_v.float(), lengths, causal=True, scale=0.25)
    ref = ref[0] if isinstance(ref, tuple) else ref
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------------------------ decode grid
def test_decode_grid_is_one_flat_axis():
    # B * Hk = 70,000 passes the 65,535 limit of grid axes 1 and 2; axis 0 takes up to 2^31 - 1.
    grid = decode_kernels.decode_grid(7000, 10, 3, 4)
    assert grid == (7000 * 10 * 3 * 4,)


# ------------------------------------------------------------------------------------------ CUDA decode kernel
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda", "attention.cu")


def _nvcc(arch, *flags):
    done = subprocess.run([NVCC, "-std=c++17", "-O2", "-gencode", f"arch=compute_{arch},code=sm_{arch}", *flags,
                           SOURCE], capture_output=True, text=True, cwd=os.path.dirname(SOURCE))
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["90a", "80"])
def test_cuda_decode_kernels_spill_nothing(arch, tmp_path):
    log = _nvcc(arch, "-Xptxas", "-v", "-c", "-o", str(tmp_path / "a.o")).stderr
    spills = [int(s) + int(ld) for s, ld in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    assert spills and not any(spills), log


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
def test_cuda_decode_kernels_divide_in_64_bits_only_once_per_block(tmp_path):
    ptx_path = tmp_path / "a.ptx"
    _nvcc("90a", "-ptx", "-o", str(ptx_path))
    per_kernel = {}
    for entry in re.split(r"\.entry\s+", ptx_path.read_text())[1:]:
        name = "split" if "decode_split_kernel" in entry.split("(")[0] else "combine"
        per_kernel.setdefault(name, []).append(len(re.findall(r"\b(?:div|rem)\.[su]64", entry)))
    # The split kernel's chunk bounds (two cdivs of int64 positions), nothing per element; nothing in combine.
    assert per_kernel["split"] and max(per_kernel["split"]) <= 2, per_kernel
    assert per_kernel["combine"] and max(per_kernel["combine"]) == 0, per_kernel
