"""Tiles of the attention kernels (genfast/kernels/attention.py, attention_sm90.py): the candidates, the tables of
tiles the compile gate measured, the register and shared-memory budgets, the rule every config passes
(``config_fits``), the autotune policy, and the environment that steers them (GENFAST_AUTOTUNE,
GENFAST_ATTENTION_TMA, TRITON_INTERPRET). Nothing here launches a kernel.

Tiles on a GPU: each kernel autotunes over the candidates that the rule (registers per thread and shared memory,
per head dim, dtype and architecture) keeps, with lengths in the key as their next power of two. Without
benchmarking (GENFAST_AUTOTUNE=0, ``autotune=False``, or inside CUDA-graph capture) it takes the first candidate
the rule keeps.
"""

from __future__ import annotations

import os

import torch
import triton

# Compiled on a GPU the tiles are autotuned; the interpreter (CPU tensors) gets one small fixed config, so the
# tests, with tiny shapes, still cross several tiles, the diagonal and the ragged edges.
AUTOTUNE = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"

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


def shared_limit() -> int:
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


def device_capability() -> tuple[int, int]:
    try:
        return tuple(torch.cuda.get_device_capability())
    except (AssertionError, RuntimeError):
        return (9, 0)


def _pruner(kernel: str):
    def prune(configs, named_args, **kwargs):
        if not AUTOTUNE:
            return configs
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
        kind = "dkdv_dq" if kernel == "dkdv" and kwargs.get("DQ_ATOMIC") else kernel
        elem = named_args["Q"].element_size()
        limit, capability = shared_limit(), device_capability()
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


def autotuned(kernel: str):
    # Lengths enter the key bucketed (next power of two), so a new length does not re-tune.
    key = ["q_bucket", "k_bucket", "BLOCK_D", "MASK_KIND", "DROPOUT", "HAS_WINDOW", "PRECISION", "VARLEN"]
    # The autotuner launches each kept config several times on the caller's tensors before the real launch (triton
    # 3.6 even a lone one). dK/dV adds dQ into dQacc (atomics or a bulk reduction): zeroed before every run, and
    # once more after the last, or the first backward of a key would return (1 + runs) x dQ. The other kernels
    # store each element once.
    reset = ["dQacc"] if kernel == "dkdv" else None
    if kernel == "dkdv":
        key += ["DQ_ATOMIC", "TMA"]
    if AUTOTUNE:
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


def heuristic_config(kernel, named_args: dict, kwargs: dict):
    """The config an autotuned kernel takes without benchmarking: the first candidate its pruner keeps."""
    configs = kernel.configs
    if kernel.early_config_prune:
        configs = kernel.early_config_prune(configs, named_args, **kwargs)
    return configs[0]


def tma_requested() -> bool | None:
    """GENFAST_ATTENTION_TMA: 0 keeps the sm_80-style forward on Hopper (False), 1 takes the TMA one wherever the
    layout allows it, under the interpreter too (True: how the CPU tests run it); unset, None (on Hopper only)."""
    choice = os.environ.get("GENFAST_ATTENTION_TMA", "").lower()
    if choice in ("0", "false", "off", "no"):
        return False
    return True if choice in ("1", "true", "on", "yes") else None


def interpreting() -> bool:
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1): no descriptor reductions there."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def tma_forward_fits(block_d: int, elem: int, dropout: bool, mask: bool) -> bool:
    """Whether the Hopper forward has a measured tile for these inputs. An attention mask keeps the other kernel:
    its [BLOCK_M, BLOCK_N] loads beside the in-flight scores spill 0.1-10 KB in every tile measured."""
    if mask:
        return False
    return any(config_fits("fwd_tma", *tile[:2], block_d, *tile[2:], elem, shared_limit(), device_capability(), dropout)
               for tile in measured_tiles("fwd_tma", block_d, elem, device_capability()))


def five_matmul_backward(elem: int, block_d: int, flagged: bool = False) -> bool:
    """dQ added by the dK/dV pass with atomics (five matmuls a tile), unless deterministic algorithms are asked
    for or no measured tile holds it (d256, fp32, a mask or dropout on Hopper): then the separate dQ pass (seven,
    in a fixed order)."""
    if torch.are_deterministic_algorithms_enabled():
        return False
    return bool(measured_tiles("dkdv_dq", block_d, elem, device_capability(), flagged))


__all__ = ["AUTOTUNE", "autotune_enabled", "autotuned", "device_capability", "config_fits", "five_matmul_backward",
           "heuristic_config", "interpreting", "length_bucket", "live_fp32_per_thread", "measured_tiles",
           "shared_bytes", "shared_limit", "tma_forward_fits", "tma_requested"]
