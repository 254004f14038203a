"""Triton kernels of genfast::attention_fwd_triton / attention_bwd_triton (FlashAttention-2 style).

Forward: one program per (BLOCK_M query rows, batch x query head). It streams key/value tiles through an
online softmax in base 2 (``exp2`` with ``scale * log2(e)`` folded into the scores), keeps only O(BLOCK_M x D)
state and writes out [B, Hq, Nq, D] and lse [B, Hq, Nq] (natural log, fp32). Only key tiles that some row
of the block may see are visited; they are split into three runs: the tiles every row sees in full (no
position mask is computed there) and the partial tiles before and after them (the causal diagonal, the
window's edges, the ragged end of Nk), where the position mask is applied.

Backward: ``delta = rowsum(dO * O) - dlse`` (a small kernel), then one program per key/value tile that
accumulates dK and dV over every query head of its GQA group (no atomics for them). By default that program also
adds its share of dQ into an fp32 buffer with atomics (five matmuls per tile: S, dP, dV, dK, dQ); under
``torch.use_deterministic_algorithms(True)``, or where no measured tile holds it (``five_matmul_backward``), one
program per query tile computes dQ instead, in a fixed order. Each recomputes P from q, k and lse, and redraws
the dropout mask from the seed. On Hopper (genfast/kernels/attention_sm90.py for the forward) the tiles come
through TMA descriptors.

Masks: an attn_mask arrives as a [B, Hq, Nq, Nk] view with stride 0 along broadcast dims, so a [Nq, Nk] or
[B, 1, 1, Nk] mask is read without being materialised. Head dims are padded to a power of two >= 16
(BLOCK_D) with masked loads, so D = 80 or 96 work. Offsets of batch/head are int64; row and key offsets are
int64 too when some element offset of a tensor reaches 2^31 (``IDX64``, chosen by the launcher), int32 otherwise.

Tiles on a GPU: each kernel autotunes over the candidates that a rule (``config_fits``: registers per thread and
shared memory, per head dim, dtype and architecture) keeps, with lengths in the key as their next power of two.
Without benchmarking (GENFAST_AUTOTUNE=0, ``autotune=False``, or inside CUDA-graph capture) it takes the first
candidate the rule keeps.

Varlen (``VARLEN=True``, launched by genfast/kernels/attention_varlen.py): the same kernels on packed
[total, H, D] tensors seen as [1, H, total, D] with batch stride 0; "batch" b is then a sequence whose rows
[cu[b], cu[b + 1]) and lengths each program reads from cu_seqlens (Nq/Nk are the max lengths the grid is
sized for), and programs whose tile starts past their sequence's length return at once. lse and the dropout
counter use the row's flat index in lse, ``row0 + i`` ((b * Hq + h) * Nq + i, or h * total_q + cu_q[b] + i).

Grids are one flat axis (tile index fastest), so B x H may pass the 65535 limit of a CUDA grid's axis 1.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation

from genfast.kernels import _philox

LOG2E = 1.4426950408889634  # the kernels spell it out: Triton globals must be constexpr

MASK_NONE, MASK_BOOL, MASK_ADD = 0, 1, 2

# Compiled on a GPU the tiles are autotuned; the interpreter (CPU tensors) gets one small fixed config, so the
# tests, with tiny shapes, still cross several tiles, the diagonal and the ragged edges.
_AUTOTUNE = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"

# (BLOCK_M, BLOCK_N, num_warps, num_stages), in order of preference: the first one the rules below keep is the
# heuristic choice (no benchmarking), the others are what the autotuner may try. For the dK/dV kernel BLOCK_N is
# its key tile and BLOCK_M the query tile it loops over.
_CANDIDATES = [(128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2),
               (64, 32, 4, 2), (64, 32, 8, 2), (64, 32, 8, 1), (32, 32, 4, 2), (32, 32, 8, 1), (16, 16, 8, 1)]
# fp32 inputs run their ieee dots on the FMA units, where each thread holds rows of both operands: small tiles.
_CANDIDATES_FP32 = [(32, 32, 4, 1), (16, 16, 4, 1), (16, 16, 8, 1)]
# Tiles measured with ptxas -v (python -m benchmarks.compile; bf16; sm_90a and sm_80; triton 3.9 and 3.6, which
# torch 2.11 pins) to neither spill nor overflow, in order of preference, where the count below does not predict
# register use: the Hopper forward (the next tile's scores in flight beside the softmax's), the five-matmul
# backward (dQ's tile beside dK/dV), and a few tiles of the others that one Triton spills and the other not.
# Key: (kernel, Hopper?, BLOCK_D); head dims under 64 take the 64 entry. No entry: the kernel is not taken there
# (d256 backward: the separate dQ pass; the tile the count allows there spills 1-9 KB with dQ fused).
_MEASURED = {
    ("fwd_tma", True, 64): [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (128, 32, 8, 2)],
    # d128 with 3 stages: its tile pairs' four streamed loads need 262 KB of shared memory.
    ("fwd_tma", True, 128): [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 2)],
    ("fwd_tma", True, 256): [(128, 32, 8, 2)],
    ("dkdv_dq", True, 64): [(128, 64, 8, 2), (64, 64, 8, 2), (64, 64, 8, 1)],
    # d128: 16-key tiles (the dK/dV dots on mma.sync); 32-key ones spill 220 B (triton 3.9) or 628 B (3.6).
    ("dkdv_dq", True, 128): [(128, 16, 8, 1), (64, 16, 8, 1)],
    ("dkdv", True, 256): [(128, 16, 8, 1)],  # with TMA: its K/V/Q/dO copies need 278,528 B of shared memory without
    ("dq", True, 256): [(64, 32, 8, 2)],
    ("dkdv_dq", False, 64): [(32, 32, 8, 1), (16, 16, 8, 1)],
    ("fwd", False, 256): [(64, 32, 8, 2), (32, 32, 4, 2), (16, 16, 8, 1)],
    ("dkdv_dq", False, 128): [(32, 32, 8, 1), (16, 16, 8, 1)],
    ("dkdv_dq", False, 256): [(32, 32, 8, 1), (16, 16, 8, 1)],
}
# With an attention mask or dropout (their [BLOCK_M, BLOCK_N] loads and Philox draws hold registers of their own),
# where measured (bf16 and fp16, d80-d128). On Hopper every five-matmul tile measured spills 8-700 B with them:
# the separate dQ pass is taken there.
_MEASURED_FLAGGED = {
    ("fwd", True, 128): [(64, 32, 8, 2)],
    ("dkdv", True, 128): [(128, 16, 8, 1), (64, 16, 8, 1)],
    ("dq", True, 128): [(64, 32, 8, 2), (128, 32, 8, 1), (64, 16, 8, 1)],
    ("dkdv_dq", True, 64): [], ("dkdv_dq", True, 128): [],
    ("fwd", False, 128): [(64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 8, 1)],
    ("dkdv_dq", False, 128): [(32, 32, 8, 1), (16, 16, 8, 1)],
}
# With dropout the Hopper forward keeps at most 112 fp32 tile elements per thread (measured: 112 fits, 160 spills).
_MEASURED_DROPOUT_BUDGET = 112
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)

# Registers: a budget of fp32 tile elements live per thread at the loop's peak (see live_fp32_per_thread), beside
# the load addresses, masks and operands in 255 registers. Calibrated on ptxas -v (bf16, head dims 64/128/256,
# sm_90a and sm_80): on sm_90a the d128 forward fits at 96 with 2 stages, spills 32 B with 3 (the in-flight loads
# hold more addresses) and 72 B at 128; d256 spills at 80 and fits at 72. sm_80's mma.sync takes both operands
# from registers: its forward spills at 96 and fits at 64, and its backward spills with key tiles of 64.
_LIVE_BUDGET = 96
_LIVE_BUDGET_D256 = 72
_LIVE_BUDGET_DEEP_PIPELINE = 80  # num_stages > 2
_LIVE_BUDGET_SM80_FWD = 64


def live_fp32_per_thread(kernel: str, block_m: int, block_n: int, block_d: int, num_warps: int) -> float:
    """fp32 tile elements each thread holds at once: forward acc[M, D] + S/P[M, N]; dQ dq[M, D] + S/P and
    dP/dS [M, N]; dK/dV dk and dv [N, D] + P and dS [M, N]."""
    tiles = {"fwd": block_m * block_d + block_m * block_n,
             "fwd_tma": block_m * block_d + 3 * block_m * block_n,  # + a pair's second score tile
             "dq": block_m * block_d + 2 * block_m * block_n,
             "dkdv": 2 * block_n * block_d + 2 * block_m * block_n,
             "dkdv_dq": 2 * block_n * block_d + 2 * block_m * block_n + block_m * block_d}[kernel]
    return tiles / (32 * num_warps)


def shared_bytes(kernel: str, block_m: int, block_n: int, block_d: int, num_stages: int, elem: int) -> int:
    """Shared memory a config needs: the tiles the loop streams, once per pipeline stage, plus the tiles loaded
    once and the staging of P/dS for their matmul. (dK/dV at d128, M128 N64, 3 stages of bf16: 248,832 B by
    this count, 247,808 B measured.)"""
    if kernel == "fwd":  # streams K and V; Q once
        return num_stages * 2 * block_n * block_d * elem + block_m * block_d * elem + block_m * block_n * elem
    if kernel == "fwd_tma":  # Q once; by tile pairs (d <= 128) it streams K, K, V, V and loads 2 tiles outside
        tiles = 4 * num_stages + 2 if block_d <= 128 else 2 * num_stages  # measured: 196,672 B at d128 M128 N64
        return tiles * block_n * block_d * elem + block_m * block_d * elem
    if kernel == "dq":  # streams K and V; Q, dO once; dS staged
        return num_stages * 2 * block_n * block_d * elem + 2 * block_m * block_d * elem + block_m * block_n * elem
    # dkdv: streams Q, dO (and lse, delta); K, V once; P and dS staged
    return (num_stages * (2 * block_m * block_d * elem + 2 * block_m * 4) + 2 * block_n * block_d * elem
            + block_m * block_n * elem)


def _shared_limit() -> int:
    """Shared memory one block may opt in to on the current GPU (227 KB on Hopper, 163 KB on A100)."""
    try:
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin)
    except (AttributeError, RuntimeError, AssertionError):
        return 99 * 1024  # the smallest of the recent GPUs (sm_86/89/120)


def measured_tiles(kernel: str, block_d: int, elem: int, capability: tuple[int, int], flagged: bool = False):
    """The measured configs of ``kernel`` (see _MEASURED, and _MEASURED_FLAGGED for inputs with a mask or dropout),
    or None where none were measured. For "fwd_tma" and "dkdv_dq" None and [] mean the kernel is not taken."""
    if elem != 2:
        return None
    key = (kernel, capability[0] >= 9, max(64, block_d))
    if flagged and key in _MEASURED_FLAGGED:
        return _MEASURED_FLAGGED[key]
    return _MEASURED.get(key)


def config_fits(kernel: str, block_m: int, block_n: int, block_d: int, num_warps: int, num_stages: int, elem: int,
                shared_limit: int, capability: tuple[int, int] = (9, 0), dropout: bool = False,
                mask: bool = False, tma: bool = True) -> bool:
    """The rule every config passes: no register spills and no shared-memory overflow on a GPU of
    ``capability`` with ``shared_limit`` bytes of shared memory per block (``elem``: bytes per input element),
    for inputs with ``dropout`` and/or an attention ``mask``. Measured tiles where they exist, else a count."""
    if shared_bytes(kernel, block_m, block_n, block_d, num_stages, elem) > shared_limit:
        return False
    config = (block_m, block_n, num_warps, num_stages)
    measured = measured_tiles(kernel, block_d, elem, capability, dropout or mask)
    if kernel == "dkdv" and block_d > 128 and not tma:
        measured = None  # the d256 entry holds through TMA only
    if kernel in ("fwd_tma", "dkdv_dq") or measured is not None:
        if config not in (measured or []):
            return False
        return not (kernel == "fwd_tma" and dropout
                    and live_fp32_per_thread(kernel, *config[:2], block_d, num_warps) > _MEASURED_DROPOUT_BUDGET)
    if elem == 4:  # FMA dots (measured on sm_90a: 32x32 fits at d64, spills 3 KB at d128; 16x16 fits at d128)
        if kernel == "dkdv" and config == (16, 16, 4, 1) and block_d >= 128:
            return False  # sm_80: 16 B spill at 96 registers; 8 warps fit in 62
        return config in _CANDIDATES_FP32 and block_m * block_n * block_d <= 65536
    if (block_m, block_n, num_warps, num_stages) not in _CANDIDATES:
        return False
    hopper = capability[0] >= 9
    if hopper and block_m < 64:
        return False  # wgmma takes 64 query rows per warpgroup: smaller tiles lower to mma.sync on Hopper
    budget = _LIVE_BUDGET if block_d <= 128 else _LIVE_BUDGET_D256
    if kernel == "fwd" and not hopper:
        budget = min(budget, _LIVE_BUDGET_SM80_FWD)
    if num_stages > 2:
        budget = min(budget, _LIVE_BUDGET_DEEP_PIPELINE)
    if kernel == "dkdv" and block_d >= 128 and num_stages > 1:
        return False  # its Q and dO tiles streamed at d >= 128 leave no registers for a second stage in flight
    if kernel == "dkdv" and block_d == 128 and num_warps == 8 and block_m < 64:
        return False  # 8 warps over fewer than 64 query rows replicate the tiles: 8-84 B spills at d128
    if kernel != "fwd" and not hopper and (block_n > 32 or (num_stages == 1 and block_d < 128)):
        return False  # mma.sync operands: the backward spills with 64-key tiles (and 1 stage at d64) on sm_80
    return live_fp32_per_thread(kernel, block_m, block_n, block_d, num_warps) <= budget


def _capability() -> tuple[int, int]:
    try:
        return tuple(torch.cuda.get_device_capability())
    except (AssertionError, RuntimeError):
        return (9, 0)


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        if not _AUTOTUNE:
            return configs
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
        kind = "dkdv_dq" if kernel == "dkdv" and kwargs.get("DQ_ATOMIC") else kernel
        elem = named_args["Q"].element_size()
        limit, capability = _shared_limit(), _capability()
        kept = [c for c in configs if config_fits(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], block_d,
                                                  c.num_warps, c.num_stages, elem, limit, capability,
                                                  bool(kwargs.get("DROPOUT")), bool(kwargs.get("MASK_KIND")),
                                                  kwargs.get("TMA", True))]
        order = measured_tiles(kind, block_d, elem, capability, bool(kwargs.get("DROPOUT") or kwargs.get("MASK_KIND")))
        if order:  # measured order, not the list's
            kept.sort(key=lambda c: order.index((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                                 c.num_stages)))
        # At most 3 to benchmark (the best-ranked that fit): a new key costs 3 runs, not 14.
        return kept[:3] or configs[-1:]
    return prune


def _tuned_candidates(kernel: str) -> list:
    """The configs a kernel's autotuner holds: every tile measured for it (for dK/dV also its five-matmul form),
    then the counted candidates; the rules then keep those that fit each call."""
    kinds = {kernel, "dkdv_dq"} if kernel == "dkdv" else {kernel}
    measured = [c for table in (_MEASURED, _MEASURED_FLAGGED) for (k, _, _), tiles in table.items() if k in kinds
                for c in tiles]
    return list(dict.fromkeys(measured if kernel == "fwd_tma" else measured + _CANDIDATES + _CANDIDATES_FP32))


def _tuned(kernel: str):
    # Lengths enter the key bucketed (next power of two), so a new length does not re-tune.
    key = ["q_bucket", "k_bucket", "BLOCK_D", "MASK_KIND", "DROPOUT", "HAS_WINDOW", "PRECISION", "VARLEN"]
    # The autotuner launches each kept config several times on the caller's tensors before the real launch (triton
    # 3.6 even a lone one). dK/dV adds dQ into dQacc (atomics or a bulk reduction): zeroed before every run, and
    # once more after the last, or the first backward of a key would return (1 + runs) x dQ. The other kernels
    # store each element once.
    reset = ["dQacc"] if kernel == "dkdv" else None
    if kernel == "dkdv":
        key += ["DQ_ATOMIC", "TMA"]
    if _AUTOTUNE:
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                   for m, n, w, s in _tuned_candidates(kernel)]
        return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": _pruner(kernel)},
                               reset_to_zero=reset)
    return triton.autotune(configs=[_INTERPRETER_CONFIG], key=key, reset_to_zero=reset)


def length_bucket(n: int) -> int:
    """The autotune key of a length: its next power of two (at least 64)."""
    return max(64, triton.next_power_of_2(max(int(n), 1)))


def autotune_enabled() -> bool:
    """Benchmark configs on a new key (the default), or take the heuristic config: with GENFAST_AUTOTUNE=0, and
    always while a CUDA graph is being captured (benchmarking cannot run inside a capture)."""
    if os.environ.get("GENFAST_AUTOTUNE", "1").lower() in ("0", "false", "off", "no"):
        return False
    try:
        return not torch.cuda.is_current_stream_capturing()
    except RuntimeError:  # a torch built without CUDA
        return True


def _launch(kernel, grid, args, kwargs, autotune=None):
    """Launch an autotuned kernel, or, without autotuning, its heuristic config: the first candidate the
    rules keep for these arguments (no benchmarking)."""
    if autotune is None:
        autotune = autotune_enabled()
    with on_device_of(args[0]):
        if autotune:
            kernel[grid](*args, **kwargs)
            return
        config = heuristic_config(kernel, dict(zip(kernel.arg_names, args)), kwargs)
        kernel.fn[grid](*args, **kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def on_device_of(t):
    """Triton launches on the current CUDA device (and asks the scratch allocator there): make it ``t``'s own, so
    a call on cuda:1 from code whose current device is cuda:0 runs where its tensors are."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def heuristic_config(kernel, named_args: dict, kwargs: dict):
    """The config an autotuned kernel takes without benchmarking: the first candidate its pruner keeps."""
    configs = kernel.configs
    if kernel.early_config_prune:
        configs = kernel.early_config_prune(configs, named_args, **kwargs)
    return configs[0]


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr, F32_DOT: tl.constexpr):
    """tl.dot with fp32 accumulation. ``F32_DOT``: upcast the (already rounded) operands first; only set under
    the interpreter, whose bf16 dot is wrong (triton 3.9), so the rounding the GPU sees is kept."""
    if F32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _scores(q, kt, offs_m, offs_n, mask_ptr, smm, smn, Nq, Nk, end_n, shift, left, right, qk_scale, mask_scale,
            MASK_KIND: tl.constexpr, POSITION: tl.constexpr, PRECISION: tl.constexpr, F32_DOT: tl.constexpr):
    """Scores of a [BLOCK_M, BLOCK_N] tile: q @ k^T * qk_scale + mask * mask_scale, -inf where masked.

    The forward works in base 2 (qk_scale = scale * log2(e), mask_scale = log2(e)); the backward in natural
    units (see _bwd_dq_kernel).

    ``POSITION``: apply the bounds (j < end_n) and the causal/window limits; off for the tiles every row sees.
    """
    return _masked(_mm(q, kt, PRECISION, F32_DOT) * qk_scale, offs_m, offs_n, mask_ptr, smm, smn, Nq, Nk, end_n,
                   shift, left, right, mask_scale, MASK_KIND, POSITION)


@triton.jit
def _masked(s, offs_m, offs_n, mask_ptr, smm, smn, Nq, Nk, end_n, shift, left, right, mask_scale,
            MASK_KIND: tl.constexpr, POSITION: tl.constexpr):
    """The scaled scores ``s`` of a tile with the attention mask and the position limits applied (see _scores)."""
    if MASK_KIND != 0:
        in_bounds = (offs_m[:, None] < Nq) & (offs_n[None, :] < Nk)
        m = tl.load(mask_ptr + offs_m[:, None] * smm + offs_n[None, :] * smn, mask=in_bounds, other=0)
        if MASK_KIND == 1:
            s = tl.where(m != 0, s, float("-inf"))
        else:
            s = s + m.to(tl.float32) * mask_scale
    if POSITION:
        pos = offs_m[:, None] + shift
        ok = (offs_n[None, :] < end_n) & (offs_n[None, :] >= pos - left) & (offs_n[None, :] <= pos + right)
        s = tl.where(ok, s, float("-inf"))
    return s


@triton.jit
def _keep(seed, row0, offs_m, offs_n, Nk, dropout_p):
    """The dropout keep mask of a [BLOCK_M, BLOCK_N] tile: Philox counter (row0 + i) * Nk + j.

    row0 + i is the row's flat index in lse: (b * Hq + h) * Nq + i, or h * total_q + cu_seqlens_q[b] + i in the
    varlen layout, where Nk is max_seqlen_k.
    """
    counter = (row0 + offs_m[:, None].to(tl.int64)) * Nk + offs_n[None, :].to(tl.int64)
    return _philox.uniform(seed, counter.to(tl.uint64)) >= dropout_p


@triton.jit
def _extent(Cu, b, N, Total, VARLEN: tl.constexpr):
    """(first row, length) of sequence b: packed rows [cu[b], cu[b + 1]) with the bounds clamped into [0, Total],
    so that no cu_seqlens values (even unchecked ones) make a program read or write outside the tensors; or
    (0, N) for the padded layout."""
    if VARLEN:
        start = tl.minimum(tl.maximum(tl.load(Cu + b), 0), Total)
        end = tl.minimum(tl.maximum(tl.load(Cu + b + 1), start), Total)
        length = end - start
        start = start.to(tl.int64)  # packed row offsets times Hq * D can pass 2^31
    else:
        start = 0
        length = N
    return start, length


@triton.jit
def _wide(offs, IDX64: tl.constexpr):
    """Row/key indices as int64 where index * stride can pass 2^31 (the launcher checks every tensor's largest
    element offset), else int32, which keeps the address arithmetic and registers of common shapes small."""
    if IDX64:
        return offs.to(tl.int64)
    return offs


@triton.jit
def _tile_and_group(N, BLOCK: tl.constexpr):
    """(tile index, batch x head index) of this program. The grid is one flat axis (tiles fastest, so programs
    that run together share a head's K/V as a 2-D grid would): axis 1 of a CUDA grid stops at 65535, which
    B x H passes with many short packed sequences."""
    tiles = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    return pid % tiles, (pid // tiles).to(tl.int64)


@triton.jit
def _row0(b, h, Hq, Nq, TotalQ, q_start, VARLEN: tl.constexpr):
    """Flat index in lse (and in the dropout counter) of the sequence's query row 0 for head h."""
    if VARLEN:
        row0 = h * TotalQ + q_start
    else:
        row0 = (b * Hq + h) * Nq
    return row0


@triton.jit
def _row_range(m0, Nq, Nk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, shift, left, right):
    """Key runs for query rows [m0, m0 + BLOCK_M): [lo, a) partial, [a, mid) full tiles, [mid, hi) partial."""
    m_last = tl.minimum(m0 + BLOCK_M, Nq) - 1
    lo = tl.maximum(0, m0 + shift - left)
    hi = tl.minimum(Nk, m_last + shift + right + 1)
    hi = tl.maximum(hi, lo)
    a = tl.minimum(tl.maximum(m_last + shift - left, lo), hi)
    b = tl.minimum(tl.maximum(m0 + shift + right + 1, a), hi)
    mid = a + ((b - a) // BLOCK_N) * BLOCK_N
    return lo, a, mid, hi


@_tuned("fwd")
@triton.jit
def _fwd_kernel(Q, K, V, Mask, Seed, Out, Lse, CuQ, CuK,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn, sob, soh, som,
                Hq, Nq, Nk, TotalQ, TotalK, D, group, qk_scale, dropout_p, drop_scale, left, right,
                q_bucket, k_bucket,
                MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                PRECISION: tl.constexpr, F32_DOT: tl.constexpr, VARLEN: tl.constexpr, IDX64: tl.constexpr,
                BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, bh = _tile_and_group(Nq, BLOCK_M)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    m0 = pid_m * BLOCK_M
    # Varlen: b is a sequence, Nq/Nk are the max lengths the grid was sized for, nq/nk this sequence's lengths.
    q_start, nq = _extent(CuQ, b, Nq, TotalQ, VARLEN)
    k_start, nk = _extent(CuK, b, Nk, TotalK, VARLEN)
    if m0 >= nq:
        return
    row0 = _row0(b, h, Hq, Nq, TotalQ, q_start, VARLEN)
    offs_m = _wide(m0 + tl.arange(0, BLOCK_M), IDX64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = _wide(tl.arange(0, BLOCK_N), IDX64)
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + (q_start + offs_m[:, None]) * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < nq) & d_ok[None, :], other=0.0)
    k_base = K + b * skb + hk * skh + k_start * skn
    v_base = V + b * svb + hk * svh + k_start * svn
    mask_ptr = Mask + b * smb + h * smh
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed).to(tl.uint64)
    shift = nk - nq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, a, mid, hi = _row_range(m0, nq, nk, BLOCK_M, BLOCK_N, shift, left, right)
    for run in tl.static_range(3):
        if run == 0:
            start, end = lo, a
        elif run == 1:
            start, end = a, mid
        else:
            start, end = mid, hi
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + offs_j
            n_ok = offs_n < end
            kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None],
                         other=0.0)
            v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :],
                        other=0.0)
            s = _scores(q, kt, offs_m, offs_n, mask_ptr, smm, smn, nq, nk, end, shift, left, right, qk_scale,
                        1.4426950408889634, MASK_KIND, run != 1, PRECISION, F32_DOT)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row that has seen only -inf so far keeps a finite shift, so exp2 gives 0 rather than NaN.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:
                p = tl.where(_keep(seed, row0, offs_m, offs_n, Nk, dropout_p), p, 0.0)
            acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION, F32_DOT)
            m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (drop_scale / l_safe)[:, None]
    row_ok = offs_m < nq
    out_ptr = Out + b * sob + h * soh + (q_start + offs_m[:, None]) * som + offs_d[None, :]
    tl.store(out_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(Lse + row0 + offs_m, lse, mask=row_ok)


@triton.jit
def _delta_kernel(Out, dOut, dLse, Delta, sob, soh, som, sdb, sdh, sdm, sdd, Hq, Nq, D,
                  HAS_DLSE: tl.constexpr, IDX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = sum_d dO_i * O_i - dlse_i: the row term of the softmax backward."""
    pid_m, bh = _tile_and_group(Nq, BLOCK_M)
    b = bh // Hq
    h = bh % Hq
    offs_m = _wide(pid_m * BLOCK_M + tl.arange(0, BLOCK_M), IDX64)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < Nq) & (offs_d[None, :] < D)
    o = tl.load(Out + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], mask=ok, other=0.0).to(tl.float32)
    do = tl.load(dOut + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=ok,
                 other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(dLse + bh * Nq + offs_m, mask=offs_m < Nq, other=0.0)
    tl.store(Delta + bh * Nq + offs_m, delta, mask=offs_m < Nq)


@_tuned("dkdv")
@triton.jit
def _bwd_dkdv_kernel(Q, K, V, dOut, Lse, Delta, Mask, Seed, dK, dV, dQacc, CuQ, CuK,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                     smb, smh, smm, smn, sgb, sgh, sgn, sab, sah, sam,
                     Hq, Hk, Nq, Nk, TotalQ, TotalK, D, group, qk_scale, scale, dropout_p, drop_scale, left, right,
                     q_bucket, k_bucket,
                     MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                     PRECISION: tl.constexpr, F32_DOT: tl.constexpr, VARLEN: tl.constexpr, IDX64: tl.constexpr,
                     DQ_ATOMIC: tl.constexpr, TMA: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key tile, summed over the query heads of its GQA group (no atomics).

    ``DQ_ATOMIC``: also add this key tile's share of dQ, dS @ K, into the fp32 ``dQacc`` with atomics: the whole
    backward in five matmuls per tile (S, dP, dV, dK, dQ) instead of seven with the separate dQ pass, at the price
    of a summation order that varies from run to run; 1: per-element atomics, 2: one bulk TMA reduction per tile
    (sm_90; the interpreter has no descriptor reductions). ``TMA``: read K, V, Q and dO tiles through tensor
    descriptors (sm_90; rows need no masks: TMA fills what lies past the sequence with zeros)."""
    pid_n, bhk = _tile_and_group(Nk, BLOCK_N)
    b = bhk // Hk
    hk = bhk % Hk
    n0 = pid_n * BLOCK_N
    q_start, nq = _extent(CuQ, b, Nq, TotalQ, VARLEN)
    k_start, nk = _extent(CuK, b, Nk, TotalK, VARLEN)
    if n0 >= nk:
        return
    offs_n = _wide(n0 + tl.arange(0, BLOCK_N), IDX64)
    offs_i = _wide(tl.arange(0, BLOCK_M), IDX64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < nk
    kv_ok = n_ok[:, None] & d_ok[None, :]
    if TMA:  # straight into shared memory, where the matmuls read them
        k = tl.make_tensor_descriptor(K + b * skb + hk * skh + k_start * skn, shape=[nk, D], strides=[skn, 1],
                                      block_shape=[BLOCK_N, BLOCK_D]).load([n0, 0])
        v = tl.make_tensor_descriptor(V + b * svb + hk * svh + k_start * svn, shape=[nk, D], strides=[svn, 1],
                                      block_shape=[BLOCK_N, BLOCK_D]).load([n0, 0])
    else:
        k = tl.load(K + b * skb + hk * skh + (k_start + offs_n[:, None]) * skn + offs_d[None, :] * skd, mask=kv_ok,
                    other=0.0)
        v = tl.load(V + b * svb + hk * svh + (k_start + offs_n[:, None]) * svn + offs_d[None, :] * svd, mask=kv_ok,
                    other=0.0)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed).to(tl.uint64)
    shift = nk - nq
    # Query rows that may see some key of this tile: j - shift - right <= i <= j - shift + left.
    n_last = tl.minimum(n0 + BLOCK_N, nk) - 1
    lo = tl.maximum(0, n0 - shift - right)
    hi = tl.minimum(nq, n_last - shift + left + 1)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(group):
        h = hk * group + g
        row0 = _row0(b, h, Hq, Nq, TotalQ, q_start, VARLEN)
        q_base = Q + b * sqb + h * sqh + q_start * sqm
        do_base = dOut + b * sdb + h * sdh + q_start * sdm
        dq_base = dQacc + b * sab + h * sah + q_start * sam
        mask_ptr = Mask + b * smb + h * smh
        if TMA:
            q_desc = tl.make_tensor_descriptor(q_base, shape=[nq, D], strides=[sqm, 1], block_shape=[BLOCK_M, BLOCK_D])
            do_desc = tl.make_tensor_descriptor(do_base, shape=[nq, D], strides=[sdm, 1],
                                                block_shape=[BLOCK_M, BLOCK_D])
            if DQ_ATOMIC == 2:
                dq_desc = tl.make_tensor_descriptor(dq_base, shape=[nq, D], strides=[sam, 1],
                                                    block_shape=[BLOCK_M, BLOCK_D])
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_i
            m_ok = offs_m < nq
            if TMA:
                q = q_desc.load([start_m, 0])
                do = do_desc.load([start_m, 0])
            else:
                q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                            mask=m_ok[:, None] & d_ok[None, :], other=0.0)
                do = tl.load(do_base + offs_m[:, None] * sdm + offs_d[None, :] * sdd,
                             mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(Lse + row0 + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(Delta + row0 + offs_m, mask=m_ok, other=0.0)
            # Rows with no visible key have lse = -inf and only -inf scores: a zero shift gives P = 0 there.
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            # Scores as [BLOCK_M, BLOCK_N] through the shared helper (bounds/positions always on here: the rows
            # of a key tile cross the diagonal at a different place per tile), then transposed views.
            s = _scores(q, tl.trans(k), offs_m, offs_n, mask_ptr, smm, smn, nq, nk, nk, shift, left, right,
                        scale, 1.0, MASK_KIND, True, PRECISION, F32_DOT)
            s = tl.where(m_ok[:, None], s, float("-inf"))
            p = tl.exp2((s - lse[:, None]) * 1.4426950408889634)
            dp = _mm(do, tl.trans(v), PRECISION, F32_DOT)
            if DROPOUT:
                keep = _keep(seed, row0, offs_m, offs_n, Nk, dropout_p)
                p_drop = tl.where(keep, p * drop_scale, 0.0)
                dp = tl.where(keep, dp * drop_scale, 0.0)
            else:
                p_drop = p
            dv += _mm(tl.trans(p_drop.to(do.dtype)), do, PRECISION, F32_DOT)
            ds = (p * (dp - delta[:, None])).to(q.dtype)
            dk += _mm(tl.trans(ds), q, PRECISION, F32_DOT)
            if DQ_ATOMIC:
                # dQ's scale is applied when the launcher converts the fp32 sum to q's dtype.
                dq = _mm(ds, k, PRECISION, F32_DOT)
                if DQ_ATOMIC == 2:  # one bulk reduction through shared memory: no per-element addresses
                    dq_desc.atomic_add([start_m, 0], dq)
                else:
                    tl.atomic_add(dq_base + offs_m[:, None] * sam + offs_d[None, :], dq,
                                  mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")

    out_ptr = b * sgb + hk * sgh + (k_start + offs_n[:, None]) * sgn + offs_d[None, :]
    tl.store(dK + out_ptr, (dk * scale).to(dK.dtype.element_ty), mask=kv_ok)
    tl.store(dV + out_ptr, dv.to(dV.dtype.element_ty), mask=kv_ok)


@_tuned("dq")
@triton.jit
def _bwd_dq_kernel(Q, K, V, dOut, Lse, Delta, Mask, Seed, dQ, CuQ, CuK,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                   smb, smh, smm, smn, sob, soh, som,
                   Hq, Nq, Nk, TotalQ, TotalK, D, group, qk_scale, scale, dropout_p, drop_scale, left, right,
                   q_bucket, k_bucket,
                   MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, HAS_WINDOW: tl.constexpr,
                   PRECISION: tl.constexpr, F32_DOT: tl.constexpr, VARLEN: tl.constexpr, IDX64: tl.constexpr,
                   BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query tile; visits the same key runs as the forward."""
    pid_m, bh = _tile_and_group(Nq, BLOCK_M)
    b = bh // Hq
    h = bh % Hq
    hk = h // group
    m0 = pid_m * BLOCK_M
    q_start, nq = _extent(CuQ, b, Nq, TotalQ, VARLEN)
    k_start, nk = _extent(CuK, b, Nk, TotalK, VARLEN)
    if m0 >= nq:
        return
    row0 = _row0(b, h, Hq, Nq, TotalQ, q_start, VARLEN)
    offs_m = _wide(m0 + tl.arange(0, BLOCK_M), IDX64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_j = _wide(tl.arange(0, BLOCK_N), IDX64)
    d_ok = offs_d < D
    m_ok = offs_m < nq
    qo_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + (q_start + offs_m[:, None]) * sqm + offs_d[None, :] * sqd, mask=qo_ok,
                other=0.0)
    do = tl.load(dOut + b * sdb + h * sdh + (q_start + offs_m[:, None]) * sdm + offs_d[None, :] * sdd, mask=qo_ok,
                 other=0.0)
    lse = tl.load(Lse + row0 + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(Delta + row0 + offs_m, mask=m_ok, other=0.0)
    # P is recomputed as exp(s - lse) in the units lse is stored in (natural), then one multiply into base 2.
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    k_base = K + b * skb + hk * skh + k_start * skn
    v_base = V + b * svb + hk * svh + k_start * svn
    mask_ptr = Mask + b * smb + h * smh
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed).to(tl.uint64)
    shift = nk - nq

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, a, mid, hi = _row_range(m0, nq, nk, BLOCK_M, BLOCK_N, shift, left, right)
    for run in tl.static_range(3):
        if run == 0:
            start, end = lo, a
        elif run == 1:
            start, end = a, mid
        else:
            start, end = mid, hi
        for start_n in range(start, end, BLOCK_N):
            offs_n = start_n + offs_j
            n_ok = offs_n < end
            kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None],
                         other=0.0)
            vt = tl.load(v_base + offs_n[None, :] * svn + offs_d[:, None] * svd, mask=n_ok[None, :] & d_ok[:, None],
                         other=0.0)
            s = _scores(q, kt, offs_m, offs_n, mask_ptr, smm, smn, nq, nk, end, shift, left, right, scale, 1.0,
                        MASK_KIND, run != 1, PRECISION, F32_DOT)
            p = tl.exp2((s - lse[:, None]) * 1.4426950408889634)
            dp = _mm(do, vt, PRECISION, F32_DOT)
            if DROPOUT:
                dp = tl.where(_keep(seed, row0, offs_m, offs_n, Nk, dropout_p), dp * drop_scale, 0.0)
            ds = p * (dp - delta[:, None])
            dq += _mm(ds.to(kt.dtype), tl.trans(kt), PRECISION, F32_DOT)
    tl.store(dQ + b * sob + h * soh + (q_start + offs_m[:, None]) * som + offs_d[None, :],
             (dq * scale).to(dQ.dtype.element_ty), mask=qo_ok)


# ------------------------------------------------------------------------------------------ launchers
def _common(q, k, attn_mask, seed, dropout_p, window):
    """Arguments shared by the kernels: mask view and strides, seed, position limits, constexprs.

    ``q`` and ``k`` are [B, H, N, D] (for the varlen layout, the [1, H, total, D] views of the packed tensors).
    ``window``: (left, right, bounded), the bounds genfast.ops._attention_common.window_bounds resolved from causal
    and the window (the rule lives there; the kernels only apply p - left <= j <= p + right).
    """
    b, hq, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    if attn_mask is None:
        mask, mask_strides, kind = q, (0, 0, 0, 0), MASK_NONE
    elif attn_mask.dtype == torch.bool:
        # Same bytes, a dtype every Triton version loads.
        mask, kind = attn_mask.view(torch.uint8), MASK_BOOL
        mask_strides = mask.stride()
    else:
        mask, mask_strides, kind = attn_mask, attn_mask.stride(), MASK_ADD
    left, right, bounded = window
    if left < 0 or right < 0:
        raise ValueError(f"attention kernels: window bounds must be resolved (>= 0), got ({left}, {right})")
    dropout = dropout_p > 0.0
    consts = dict(MASK_KIND=kind, DROPOUT=dropout, HAS_WINDOW=bool(bounded),
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                  F32_DOT=q.dtype == torch.bfloat16 and q.device.type == "cpu",
                  BLOCK_D=max(16, triton.next_power_of_2(d)))
    return dict(
        mask=mask, mask_strides=mask_strides, seed=seed if dropout else q, b=b, hq=hq, hk=hk, nq=nq, nk=nk, d=d,
        group=hq // hk, left=left, right=right, drop_scale=1.0 / (1.0 - dropout_p), consts=consts,
    )


class _Layout:
    """Where the kernels find each sequence: padded [B, H, N, D] tensors (``cu_q is None``), or packed
    [total, H, D] ones whose sequence b holds rows [cu[b], cu[b + 1]) (FlashAttention's varlen layout).

    The kernels see both as [B, H, N, D] strides; packed tensors become [1, H, total, D] views whose batch
    stride is passed as 0, the rows of sequence b being found from cu_seqlens instead.
    """

    def __init__(self, q4, k4, cu_q=None, cu_k=None, max_q=None, max_k=None):
        self.varlen = cu_q is not None
        if self.varlen:
            self.nseq, self.max_q, self.max_k = cu_q.shape[0] - 1, max_q, max_k
            self.cu_q, self.cu_k = cu_q, cu_k
        else:
            self.nseq, self.max_q, self.max_k = q4.shape[0], q4.shape[2], k4.shape[2]
            self.cu_q = self.cu_k = q4  # never read (VARLEN is a constexpr False)
        self.total_q, self.total_k = q4.shape[2], k4.shape[2]

    def strides(self, t4, n=4):
        st = t4.stride()
        return ((0,) + st[1:n]) if self.varlen else st[:n]


def packed_view(t):
    """[total, H, D] -> [1, H, total, D], no copy."""
    return t.transpose(0, 1).unsqueeze(0)


def needs_int64(*tensors) -> bool:
    """Whether some element offset (sum of index * stride) of these tensors reaches 2^31, so that the kernels
    must compute row/key offsets in int64 (IDX64)."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) >= 2**31
               for t in tensors if t is not None and t.numel() > 0)


def _descriptor_layout(t) -> bool:
    """TMA's layout rules for a [B, H, N, D] tensor: the last dim contiguous, the start and the other strides
    16-byte aligned (strides of 0, the varlen batch, are fine)."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return False
    size = t.element_size()
    return not (t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]))


def tma_eligible(*tensors, accumulators=()) -> bool:
    """Whether tensor descriptors can describe these [B, H, N, D] fp16/bf16 tensors, and the fp32
    ``accumulators`` a descriptor reduces into (the backward's dQ sum: its rows are 4 * D bytes apart, so a q
    whose padded rows are aligned may still give it unaligned ones when D % 4 != 0)."""
    if any(t.dtype not in (torch.float16, torch.bfloat16) for t in tensors):
        return False
    return all(_descriptor_layout(t) for t in (*tensors, *accumulators))


# One allocator per device, made once: Triton keeps the allocator in a ContextVar and asks it for scratch at each
# launch, so it is (re)set to the launch's device before every launch.
_SCRATCH_ALLOCATORS: dict = {}


def scratch_allocator(device: torch.device):
    """The allocator of descriptor scratch on ``device``: torch's caching allocator (so CUDA-graph capture and
    streams work as for any tensor)."""
    device = torch.device(device)
    if device not in _SCRATCH_ALLOCATORS:
        def scratch(size: int, alignment: int, stream):
            return torch.empty(size, dtype=torch.int8, device=device)

        _SCRATCH_ALLOCATORS[device] = scratch
    return _SCRATCH_ALLOCATORS[device]


def set_scratch_allocator(device: torch.device) -> None:
    """Descriptors made on the device live in a little global scratch per program, which Triton asks of the
    allocator given to ``triton.set_allocator``. Give it the allocator of ``device`` (the launch's tensors'), unless
    the caller has set one of their own; one of ours made for another device is replaced, since an allocator
    pinned to the first device seen would hand a launch on a second GPU scratch on the first."""
    current = _allocation._allocator.get()
    if current is not _allocation._NULL_ALLOCATOR and current not in _SCRATCH_ALLOCATORS.values():
        return
    triton.set_allocator(scratch_allocator(device))


def use_tma(q4, k4, v4, *more, accumulators=(), tma=None) -> bool:
    """Take the Hopper forward (genfast/kernels/attention_sm90.py)? ``tma=None``: on a GPU of capability 9.x when
    the tensors (and the fp32 ``accumulators`` a descriptor reduces into) allow it; True: always (the interpreter
    runs it on CPU tensors; a layout TMA cannot describe raises); False: never."""
    if tma is None:
        # GENFAST_ATTENTION_TMA=0 keeps the sm_80-style kernel on Hopper; =1 takes the TMA one wherever the layout
        # allows it (under the interpreter too: how the CPU tests run it).
        choice = os.environ.get("GENFAST_ATTENTION_TMA", "").lower()
        if choice in ("0", "false", "off", "no"):
            return False
        hopper = q4.is_cuda and _capability()[0] == 9
        tma = (hopper or choice in ("1", "true", "on", "yes")) and tma_eligible(q4, k4, v4, *more,
                                                                                accumulators=accumulators)
    elif tma and not tma_eligible(q4, k4, v4, *more, accumulators=accumulators):
        raise ValueError("tma=True needs fp16/bf16 q, k, v with a contiguous head dim and 16-byte aligned rows "
                         "(and, for the backward, a head dim that is a multiple of 4: dQ's fp32 rows)")
    if tma:
        set_scratch_allocator(q4.device)
    return bool(tma)


def _tma_forward_fits(c, elem: int) -> bool:
    """Whether the Hopper forward has a measured tile for these inputs. An attention mask keeps the other kernel:
    its [BLOCK_M, BLOCK_N] loads beside the in-flight scores spill 0.1-10 KB in every tile measured."""
    consts = c["consts"]
    if consts["MASK_KIND"] != MASK_NONE:
        return False
    return any(config_fits("fwd_tma", *tile[:2], consts["BLOCK_D"], *tile[2:], elem, _shared_limit(), _capability(),
                           consts["DROPOUT"])
               for tile in measured_tiles("fwd_tma", consts["BLOCK_D"], elem, _capability()))


def five_matmul_backward(elem: int, block_d: int, flagged: bool = False) -> bool:
    """dQ added by the dK/dV pass with atomics (five matmuls a tile), unless deterministic algorithms are asked
    for or no measured tile holds it (d256, fp32, a mask or dropout on Hopper): then the separate dQ pass (seven,
    in a fixed order)."""
    if torch.are_deterministic_algorithms_enabled():
        return False
    return bool(measured_tiles("dkdv_dq", block_d, elem, _capability(), flagged))


def _launch_fwd(q4, k4, v4, out4, lse, lay, c, scale, dropout_p, autotune=None, tma=None):
    def grid(meta):
        return (triton.cdiv(lay.max_q, meta["BLOCK_M"]) * lay.nseq * c["hq"],)

    args = (
        q4, k4, v4, c["mask"], c["seed"], out4, lse, lay.cu_q, lay.cu_k, *lay.strides(q4), *lay.strides(k4),
        *lay.strides(v4), *c["mask_strides"], *lay.strides(out4, 3), c["hq"], lay.max_q, lay.max_k, lay.total_q,
        lay.total_k, c["d"], c["group"], scale * LOG2E, dropout_p, c["drop_scale"], c["left"], c["right"],
        length_bucket(lay.max_q), length_bucket(lay.max_k),
    )
    idx64 = needs_int64(q4, k4, v4, out4, c["mask"] if c["consts"]["MASK_KIND"] else None)
    kernel = _fwd_kernel
    if use_tma(q4, k4, v4, tma=tma) and _tma_forward_fits(c, q4.element_size()):
        from genfast.kernels import attention_sm90  # imports this module's jit helpers: imported at call time

        kernel = attention_sm90._fwd_tma_kernel
    _launch(kernel, grid, args, dict(VARLEN=lay.varlen, IDX64=idx64, **c["consts"]), autotune)


def _launch_bwd(grad_out4, grad_lse, q4, k4, v4, out4, lse, dq4, dk4, dv4, lay, c, scale, dropout_p, autotune=None,
                tma=None):
    """delta, then dK/dV per key tile; dQ either added by that same kernel with fp32 atomics (five matmuls per
    tile), or, under ``torch.use_deterministic_algorithms(True)``, by its own pass (seven, a fixed order)."""
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    block_d = c["consts"]["BLOCK_D"]
    block_m = (64 if _AUTOTUNE else 16) * 64 // max(64, block_d)  # o and dO rows in fp32: 32 at d256, no spill
    idx64 = needs_int64(q4, k4, v4, out4, grad_out4, dq4, dk4, dv4,
                        c["mask"] if c["consts"]["MASK_KIND"] else None)
    # delta for every stored row, whatever sequence it belongs to: lse is [B, Hq, Nq] (or [Hq, total_q], B = 1).
    rows = lse.shape[-1]
    with on_device_of(out4):
        _delta_kernel[(triton.cdiv(rows, block_m) * (lse.numel() // max(rows, 1)),)](
            out4, grad_out4, grad_lse.contiguous() if grad_lse is not None else lse, delta, *out4.stride()[:3],
            *grad_out4.stride(), c["hq"], rows, c["d"], HAS_DLSE=grad_lse is not None, IDX64=idx64,
            BLOCK_M=block_m, BLOCK_D=block_d,
        )
    atomic = five_matmul_backward(q4.element_size(), block_d,
                                  c["consts"]["MASK_KIND"] != MASK_NONE or c["consts"]["DROPOUT"])
    dq_acc = torch.zeros(q4.shape, dtype=torch.float32, device=q4.device) if atomic else dq4
    tma = use_tma(q4, k4, v4, grad_out4, accumulators=(dq_acc,) if atomic else (), tma=tma)
    reduce = 0 if not atomic else 2 if tma and os.environ.get("TRITON_INTERPRET") != "1" else 1
    strides = (*lay.strides(q4), *lay.strides(k4), *lay.strides(v4), *lay.strides(grad_out4), *c["mask_strides"])
    consts = dict(VARLEN=lay.varlen, IDX64=idx64, **c["consts"])
    buckets = (length_bucket(lay.max_q), length_bucket(lay.max_k))
    _launch(_bwd_dkdv_kernel, lambda meta: (triton.cdiv(lay.max_k, meta["BLOCK_N"]) * lay.nseq * c["hk"],), (
        q4, k4, v4, grad_out4, lse, delta, c["mask"], c["seed"], dk4, dv4, dq_acc, lay.cu_q, lay.cu_k, *strides,
        *lay.strides(dk4, 3), *lay.strides(dq_acc, 3), c["hq"], c["hk"], lay.max_q, lay.max_k, lay.total_q,
        lay.total_k, c["d"], c["group"], scale * LOG2E, scale, dropout_p, c["drop_scale"], c["left"], c["right"],
        *buckets,
    ), dict(consts, DQ_ATOMIC=reduce, TMA=tma), autotune)
    if atomic:
        dq4.copy_(dq_acc.mul_(scale))
        return
    _launch(_bwd_dq_kernel, lambda meta: (triton.cdiv(lay.max_q, meta["BLOCK_M"]) * lay.nseq * c["hq"],), (
        q4, k4, v4, grad_out4, lse, delta, c["mask"], c["seed"], dq4, lay.cu_q, lay.cu_k, *strides,
        *lay.strides(dq4, 3), c["hq"], lay.max_q, lay.max_k, lay.total_q, lay.total_k, c["d"], c["group"],
        scale * LOG2E, scale, dropout_p, c["drop_scale"], c["left"], c["right"], *buckets,
    ), consts, autotune)


def attention_fwd(q, k, v, attn_mask, seed, dropout_p, scale, window, *, autotune=None, tma=None):
    """``window``: the resolved (left, right, bounded) of genfast.ops._attention_common.window_bounds.
    ``autotune``: None follows :func:`autotune_enabled`; False takes the heuristic config (no benchmarking).
    ``tma``: see :func:`use_tma`."""
    c = _common(q, k, attn_mask, seed, dropout_p, window)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    _launch_fwd(q, k, v, out, lse, _Layout(q, k), c, scale, dropout_p, autotune, tma)
    return out, lse


def attention_bwd(grad_out, grad_lse, q, k, v, out, lse, attn_mask, seed, dropout_p, scale, window, *, autotune=None,
                  tma=None):
    c = _common(q, k, attn_mask, seed, dropout_p, window)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    _launch_bwd(grad_out, grad_lse, q, k, v, out, lse, dq, dk, dv, _Layout(q, k), c, scale, dropout_p,
                autotune, tma)
    return dq, dk, dv


__all__ = ["attention_fwd", "attention_bwd", "autotune_enabled", "length_bucket", "config_fits"]
