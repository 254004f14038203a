"""Representative launches of every Triton kernel in genfast/kernels, per family.

Each case calls a launcher of genfast/kernels on meta tensors that report a CUDA device, so the launcher
builds the exact launches it makes on a GPU (tile choices, constexpr flags, autotuned kernels); the gate
compiles what it captured. Configs are never listed here: they come from the kernels' own autotuners and
launch heuristics at run time. The shapes are those the kernels meet (head dims 64/128/256, GQA, odd
lengths) with ints that specialize as a typical call's would.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from typing import Callable

import torch

# The families of the compile report, in report order.
FAMILIES = ("attention", "attention_varlen", "attention_decode", "conv_transpose", "sampling", "diffusion", "latent",
            "random", "lstm")

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
_SHORT = {BF16: "bf16", FP16: "fp16", FP32: "fp32"}


@dataclasses.dataclass
class Case:
    """``sweep``: a group name. An autotuned launch of a case with a group compiles every config its autotuner
    keeps that no earlier case of the group compiled for that kernel: the group's cases come largest head dim
    first, so each config is built once, at the largest shape it may be picked for (the most registers and
    shared memory). Without a group, only the first config the autotuner keeps is built (a spot check of
    another dtype or flag set, which keeps the whole gate within a few minutes on 2 cores)."""

    family: str
    name: str  # shown in each row's config: dtype, shape and flags
    run: Callable[[dict], None]  # run(kernel modules by short name): calls the launchers
    sweep: str | None = None


def kernel_modules() -> dict:
    """genfast.kernels.* imported as on a GPU: modules that choose tiles or autotune at import time when CUDA
    is present (``torch.cuda.is_available()``, no TRITON_INTERPRET) are (re)imported with that answer."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile gate needs compiled Triton: unset TRITON_INTERPRET")
    import genfast.kernels as package

    available = torch.cuda.is_available
    torch.cuda.is_available = lambda: True
    try:
        modules = {}
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: (m.name != "_philox", m.name)):
            name = f"genfast.kernels.{info.name}"
            module = importlib.import_module(name)
            modules[info.name] = importlib.reload(module)
        # attention_varlen binds attention's launchers at import: rebind to the reloaded ones.
        if "attention_varlen" in modules:
            modules["attention_varlen"] = importlib.reload(modules["attention_varlen"])
        return modules
    finally:
        torch.cuda.is_available = available


def _unwindowed(causal, nq, nk):
    """The resolved window bounds the ops hand the kernels for a call without a window (the same values as a real
    call's, which the kernels may specialise on). genfast is imported with the kernels (kernel_modules)."""
    from genfast.ops._attention_common import window_bounds

    return window_bounds(causal, -1, -1, nq, nk)


def _empty(*shape, dtype=BF16):
    return torch.empty(*shape, dtype=dtype, device="cuda")


def _attention(dtype, d, *, causal=True, mask=None, dropout=0.0, hq=8, hk=2, n=1024):
    def run(k):
        q = _empty(2, hq, n, d, dtype=dtype)
        kv = _empty(2, hk, n, d, dtype=dtype)
        seed = _empty(1, dtype=torch.int64)
        attn_mask = None
        if mask == "bool":
            attn_mask = _empty(n, n, dtype=torch.bool).expand(2, hq, n, n)
        elif mask == "add":
            attn_mask = _empty(2, 1, 1, n, dtype=dtype).expand(2, hq, n, n)
        window = _unwindowed(causal, n, n)
        out, lse = k["attention"].attention_fwd(q, kv, kv, attn_mask, seed, dropout, d ** -0.5, window)
        out, lse = _empty(*q.shape, dtype=dtype), _empty(*q.shape[:3], dtype=FP32)
        k["attention"].attention_bwd(out, None, q, kv, kv, out, lse, attn_mask, seed, dropout, d ** -0.5, window)
    return run


def _varlen(dtype, d, causal=True):
    def run(k):
        total, seqs = 3001, 7
        q = _empty(total, 8, d, dtype=dtype)
        kv = _empty(total, 2, d, dtype=dtype)
        cu = _empty(seqs + 1, dtype=torch.int32)
        seed = _empty(1, dtype=torch.int64)
        window = _unwindowed(causal, total, total)
        out, lse = k["attention_varlen"].attention_varlen_fwd(q, kv, kv, cu, cu, 1024, 1024, seed, 0.0, d ** -0.5,
                                                              window)
        out, lse = _empty(*q.shape, dtype=dtype), _empty(8, total, dtype=FP32)
        k["attention_varlen"].attention_varlen_bwd(out, None, q, kv, kv, out, lse, cu, cu, 1024, 1024, seed, 0.0,
                                                   d ** -0.5, window)
    return run


def _decode(dtype, d, nq, group, page=None):
    """The decode and append kernels over a dense cache, or with ``page`` over a paged one (block_table)."""
    def run(k):
        b, hk, nmax = 4, 8, 4096
        q = _empty(b, hk * group, nq, d, dtype=dtype)
        cache = _empty(b, hk, nmax, d, dtype=dtype) if page is None else _empty(b * nmax // page, hk, page, d,
                                                                                  dtype=dtype)
        table = None if page is None else _empty(b, nmax // page, dtype=torch.int32)
        lengths = _empty(b, dtype=torch.int32)
        left, right, _ = _unwindowed(True, nq, nmax)
        k["attention_decode"].attention_decode(q, cache, cache, lengths, True, d ** -0.5, left, right, 0, table)
        new = _empty(b, hk, nq, d, dtype=dtype)
        k["attention_decode"].kv_cache_append(cache, cache, new, new, lengths, table)
    return run


def _conv(dtype, channels_last, stride, kernel, c_in=256, c_out=128, activation="relu"):
    def run(k):
        from genfast.ops.conv_transpose import ACTIVATIONS

        code = ACTIVATIONS.index(activation)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x = _empty(8, c_in, 17, 17, dtype=dtype).to(memory_format=fmt)
        w = _empty(c_in, c_out, kernel, kernel, dtype=dtype)
        size = 16 * stride + kernel - 2
        out = _empty(8, c_out, size, size, dtype=dtype).to(memory_format=fmt)
        pre = torch.empty_like(out)
        bias, scale = _empty(c_out, dtype=dtype), _empty(c_out, dtype=FP32)
        ct = k["conv_transpose"]
        ct.conv_transpose2d(x, w, bias, out, pre, (stride, stride), (1, 1), 1, (1, 1), scale, scale, code, 0.2)
        ct.epilogue_backward(out, pre, scale, scale, code, 0.2, torch.empty_like(out))
    return run


def _sampling(dtype, vocab=50257):
    def run(k):
        logits = _empty(16, vocab, dtype=dtype)
        temp, top_p, min_p = (_empty(16, dtype=FP32) for _ in range(3))
        top_k = _empty(16, dtype=torch.int64)
        k["sampling"].filter_logits(logits, temp, top_k, top_p, min_p)
        k["sampling"].sample_tokens(logits, temp, top_k, top_p, min_p, None, _empty(1, dtype=torch.int64))
        k["sampling"].sample_tokens(logits, temp, top_k, top_p, min_p, _empty(16, vocab, dtype=FP32), None)
        # per-row seeds and offsets (HAS_OFFSETS)
        k["sampling"].sample_tokens(logits, temp, top_k, top_p, min_p, None, top_k, top_k)
    return run


def _diffusion(dtype):
    def run(k):
        x = _empty(2, 4, 64, 64, dtype=dtype)
        coefs = _empty(16, dtype=FP32)
        seed = _empty(1, dtype=torch.int64)
        k["diffusion"].scheduler_step(x, x, None, 7.5, coefs, None, seed)
        k["diffusion"].scheduler_step(x, x, x, 7.5, coefs, x, None)
        k["diffusion"].scheduler_step(x, x, None, 1.0, coefs, None, None)
        k["diffusion"].cfg_combine(x, x, 7.5)
    return run


def _latent(dtype):
    def run(k):
        mu = _empty(64, 4, 32, 32, dtype=dtype)
        seed = _empty(1, dtype=torch.int64)
        lat = k["latent"]
        lat.reparameterize(mu, mu, None, seed)
        lat.reparameterize(mu, mu, mu, None)
        lat.reparameterize_backward(mu, mu, None, seed)
        lat.gaussian_kl(mu, mu)  # 64 rows of 4096: split rows, two stages
        lat.gaussian_kl(_empty(4096, 16, dtype=dtype), _empty(4096, 16, dtype=dtype))  # one stage
        lat.gaussian_kl_backward(_empty(64, dtype=FP32), mu, mu)
        lat.langevin_step(mu, mu, 0.01, 0.1, -1.0, 1.0, None, seed)
        lat.langevin_step(mu, mu, 0.01, 0.1, float("-inf"), float("inf"), mu, None)
    return run


def _random():
    def run(k):
        seed = _empty(1, dtype=torch.int64)
        k["random"].philox_noise(seed, 1 << 20, 0, True)
        k["random"].philox_noise(seed, 1 << 20, 3, False)
    return run


def _lstm(dtype, batch=64, hidden=1024):
    def run(k):
        gates = _empty(batch, 4 * hidden, dtype=dtype)
        c = _empty(batch, hidden, dtype=dtype)
        k["lstm"].lstm_cell(gates, gates, c)
        k["lstm"].lstm_cell_backward(c, c, gates, gates, c)
    return run


def cases() -> list[Case]:
    """The gate's cases. Sweeps (every config) where the tiles are tuned: attention in bf16 at head dims
    256/128/64 and the transposed convolution in bf16 channels_last; one config per kernel elsewhere (fp16
    lowers to the same instructions as bf16; fp32, masks, dropout, varlen, NCHW and the other families are
    spot-checked), so that both Tritons and both archs compile in a few minutes on 2 cores."""
    out = [Case("attention", f"bf16 d{d} causal GQA", _attention(BF16, d), sweep="attention bf16")
           for d in (256, 128, 64)]
    out += [
        Case("attention", "fp32 d128 causal GQA", _attention(FP32, 128)),
        Case("attention", "bf16 d128 bool-mask dropout", _attention(BF16, 128, causal=False, mask="bool",
                                                                      dropout=0.1)),
        Case("attention", "fp16 d80 additive-mask N1000", _attention(FP16, 80, causal=False, mask="add", n=1000)),
        Case("attention_varlen", "bf16 d128 causal", _varlen(BF16, 128)),
    ]
    for dtype, d, nq, group in ((BF16, 128, 1, 4), (FP16, 128, 4, 8), (FP32, 256, 1, 1)):
        out.append(Case("attention_decode", f"{_SHORT[dtype]} d{d} Nq{nq} group{group}", _decode(dtype, d, nq, group)))
    out += [Case("attention_decode", f"{_SHORT[dtype]} d{d} Nq{nq} group{group} paged{page}",
                 _decode(dtype, d, nq, group, page))
            for dtype, d, nq, group, page in ((BF16, 128, 1, 4, 16), (FP32, 256, 1, 1, 128))]
    out.append(Case("conv_transpose", "bf16 channels_last k4 s2", _conv(BF16, True, 2, 4), sweep="conv bf16"))
    out += [Case("conv_transpose", f"{_SHORT[dtype]} {layout} k4 s2", _conv(dtype, layout == "channels_last", 2, 4))
            for dtype, layout in ((BF16, "NCHW"), (FP16, "channels_last"), (FP32, "channels_last"))]
    out.append(Case("conv_transpose", "bf16 NCHW k3 s1 gelu", _conv(BF16, False, 1, 3, activation="gelu")))
    out += [Case("sampling", "bf16 vocab 50257", _sampling(BF16)), Case("diffusion", "fp32", _diffusion(FP32)),
            Case("latent", "fp32", _latent(FP32)), Case("random", "fp32", _random()),
            Case("lstm", "bf16 hidden 1024", _lstm(BF16))]
    return out
