"""Attention for generation with a KV cache: ``attention_decode`` (flash-decoding) and ``kv_cache_append``.

Layout: q [B, Hq, Nq, D] holds the Nq (1..16) new tokens of each sequence; the caches k_cache, v_cache
[B, Hk, Nmax, D] hold each sequence's keys/values in its first ``cache_seqlens[b]`` slots, *the new tokens
included* (append them first with ``kv_cache_append``, then advance ``cache_seqlens`` by Nq). So
``Nq <= cache_seqlens[b] <= Nmax`` and new token i sits at position ``p_i = cache_seqlens[b] - Nq + i``:
the queries are aligned bottom-right on the sequence's prefix, exactly as ``attention`` aligns them when
called on that prefix (the reference ``attention_decode_ref`` does just that, which is the specification).
``causal`` (default True: the new tokens see each other causally) keeps keys ``j <= p_i``;
``window=(left, right)`` keeps ``p_i - left <= j <= p_i + right``; keys at or past ``cache_seqlens[b]`` are
never seen. GQA when Hk divides Hq. Inference only: no gradient.

Validation of ``cache_seqlens`` values needs the host (one synchronisation); ``validate=False`` skips it
(and torch.compile skips it), and the kernels stay memory-safe: lengths are clamped to [0, Nmax] on the
device and rows that then see no key give 0 (lse -inf); an append writes token t to slot ``L_b + t`` only where
that slot is in [0, Nmax) and drops it otherwise, on every backend (a negative length is not clamped to 0).

Backends: CUDA tensors -> the Triton split-K kernels (genfast/kernels/attention_decode.py), or the CUDA C++
kernel (csrc/cuda/attention.cu, custom op ``genfast::attention_decode``) when asked for by name; CPU tensors ->
the C++ kernel (csrc/cpu/attention_decode.cpp: reads only each sequence's visible slots, once per GQA group),
else the reference (masked math over the whole cache: torch's SDPA in the input dtype, or the written-out math
in fp32 when lse is wanted). ``kv_cache_append`` is an in-place copy on every backend (custom op
``genfast::kv_cache_append`` on the CPU, its Triton twin on GPUs); caches whose rows share memory, or a key cache
that overlaps the value cache, are refused (the writes would land on each other).

Paged caches (``block_table=``, as in vLLM): k_cache, v_cache [num_blocks, Hk, block_size, D] are a pool of
blocks of ``block_size`` slots (a power of two from 16 to 256, read from the caches' dim 2) and ``block_table``
int32 [B, max_blocks_per_seq] names sequence b's blocks in order: its logical slot j lives in block
``block_table[b, j // block_size]`` at offset ``j % block_size``. The logical capacity is
Nmax = max_blocks_per_seq * block_size, and everything else (lengths, causal, windows, GQA, Nq, splits, batch
invariance, lse) is the dense cache's semantics over that logical view: ``paged_to_dense`` is the specification.
Entries a sequence does not need (blocks past its length, or wholly left of its window) are never read, so they
may hold anything (-1, say). An entry a sequence needs that is outside [0, num_blocks) is a ValueError naming
block_table when ``validate``; without validation no kernel reads or writes outside the pool: decode *clamps*
such an entry to [0, num_blocks) (it reads some block of the pool: memory-safe, the row's result meaningless),
and an append *drops* the tokens headed for it (a write must never land in another sequence's block).
"""

from __future__ import annotations

import contextlib
import numbers

import torch
import torch.nn.functional as F

from genfast import _backend, _ext
from genfast.ops import _checks
from genfast.ops._attention_common import TRITON_MAX_HEAD_DIM, softmax_scale, window_bounds
from genfast.ops._attention_common import attention_math as _math
from genfast.ops._attention_common import bool_flag as _flag
from genfast.ops._attention_common import window_pair as _window_pair
from genfast.ops.attention import attention_ref

OP = "attention_decode"
APPEND = "kv_cache_append"
MAX_NEW_TOKENS = 16
SEQLEN_DTYPES = (torch.int32, torch.int64)
# Slots per block of a paged cache: powers of two (a slot's block and offset are a shift and a mask in the kernels).
PAGE_SIZES = (16, 32, 64, 128, 256)
# The kernels' num_splits value that asks for batch invariance: a split count from the cache capacity Nmax, the head
# dim and the dtype alone (each kernel's own rule), so a row's output is bitwise the same whatever else is batched.
INVARIANT_SPLITS = -1
# Whether the trusted callers' decode (decode_checked_cache: genfast.nn's KV-cache attention) is batch-invariant;
# set by GPT.generate(seed=...) through batch_invariant_decode(). A module global, not a ContextVar: torch.compile
# (fullgraph) cannot trace ContextVar.get, while it guards on a global's value.
_batch_invariant = False


# ------------------------------------------------------------------------------------------ reference
def paged_to_dense(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """The logical dense view [B, Hk, max_blocks_per_seq * block_size, D] of a paged cache
    [num_blocks, Hk, block_size, D] (a gathered copy). Entries outside [0, num_blocks) are clamped into it, as the
    kernels clamp them without validation (only slots a sequence does not need may come from such entries)."""
    blocks, hk, page, d = cache.shape
    b, per_seq = block_table.shape
    gathered = cache[block_table.to(torch.int64).clamp(0, blocks - 1)]  # (B, max_blocks, Hk, page, D)
    return gathered.permute(0, 2, 1, 3, 4).reshape(b, hk, per_seq * page, d)


def attention_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                         *, scale: float | None = None, causal: bool = True,
                         window: tuple[int | None, int | None] | None = None, return_lse: bool = False,
                         compute_dtype: torch.dtype | None = None, block_table: torch.Tensor | None = None):
    """The specification: ``attention_ref`` on each sequence's cache prefix (host loop, one slice per sequence);
    a paged cache is read through its dense view (``paged_to_dense``)."""
    if block_table is not None:
        k_cache, v_cache = paged_to_dense(k_cache, block_table), paged_to_dense(v_cache, block_table)
    if q.shape[0] == 0:  # an empty batch
        out, lse = q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)
        return (out, lse) if return_lse else out
    outs, lses = [], []
    for b, length in enumerate(cache_seqlens.tolist()):
        out, lse = attention_ref(q[b:b + 1], k_cache[b:b + 1, :, :length], v_cache[b:b + 1, :, :length],
                                 causal=causal, scale=scale, window=window, return_lse=True,
                                 compute_dtype=compute_dtype)
        outs.append(out)
        lses.append(lse)
    out, lse = torch.cat(outs), torch.cat(lses)
    return (out, lse) if return_lse else out


def decode_allowed(cache_seqlens: torch.Tensor, nq: int, nmax: int, left: int, right: int) -> torch.Tensor:
    """Bool [B, Nq, Nmax]: True where new token i of sequence b may see cache slot j (no host sync); ``left`` and
    ``right`` are the bounds ``window_bounds`` resolved (genfast/ops/_attention_common.py), as the kernels take."""
    device = cache_seqlens.device
    length = cache_seqlens.to(torch.int64).clamp(0, nmax)[:, None, None]
    pos = length - nq + torch.arange(nq, device=device)[None, :, None]
    j = torch.arange(nmax, device=device)[None, None, :]
    return (j < length) & (j >= pos - left) & (j <= pos + right)


def _reference(q, k_cache, v_cache, cache_seqlens, causal, scale, left, right, num_splits, need_lse,
               block_table=None):
    """The dispatcher's reference: masked attention over the whole cache, compile-friendly (no host sync); a paged
    cache is gathered into its dense view first."""
    if block_table is not None:
        k_cache, v_cache = paged_to_dense(k_cache, block_table), paged_to_dense(v_cache, block_table)
    ok = decode_allowed(cache_seqlens, q.shape[2], k_cache.shape[2], left, right)[:, None]  # (B, 1, Nq, Nmax)
    # Slots past a sequence's length may hold anything (NaN from torch.empty): a masked score still multiplies
    # its value by 0, and 0 * NaN = NaN, so they are zeroed here (the kernels never read them at all).
    filled = (torch.arange(k_cache.shape[2], device=q.device) < cache_seqlens[:, None])[:, None, :, None]
    if block_table is not None:  # entries no row needs (-1, say) were clamped onto some block: zero all it cannot see
        filled = ok.any(2)[..., None]
    k_cache, v_cache = torch.where(filled, k_cache, 0.0), torch.where(filled, v_cache, 0.0)
    compute_dtype = torch.promote_types(q.dtype, torch.float32)
    if need_lse:
        return _math(q, k_cache, v_cache, ok, None, False, 0.0, scale, -1, -1, compute_dtype)
    # torch's fused kernel in the input dtype; rows with no visible key are set to 0 whatever SDPA gives there.
    out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=ok, scale=scale,
                                         enable_gqa=q.shape[1] != k_cache.shape[1])
    out = torch.where(ok.any(-1, keepdim=True), out, 0.0)
    # SDPA also gives NaN for a row whose visible scores are all -inf (an infinite entry of q or of the keys), where
    # the specification, like every kernel, gives 0 (no key to attend to). A NaN row is rare and tells the two cases
    # apart from a genuine NaN only through the scores, so such a call is computed by the written-out math: in eager
    # CPU calls only when out holds a NaN (a read of out, which is q's size); traced, or on a GPU where the test
    # would synchronise, always, branch-free.
    if q.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(out.isnan().any()):
            return out, None
        return _math(q, k_cache, v_cache, ok, None, False, 0.0, scale, -1, -1, compute_dtype)[0], None
    exact = _math(q, k_cache, v_cache, ok, None, False, 0.0, scale, -1, -1, compute_dtype)[0]
    return torch.where(out.isnan(), exact, out), None


def kv_cache_append_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                        cache_seqlens: torch.Tensor, block_table: torch.Tensor | None = None) -> None:
    """In place: ``cache[b, :, L_b + t] = new[b, :, t]``; positions outside [0, Nmax) are dropped. Paged: logical
    slot L_b + t of sequence b, i.e. block ``block_table[b, (L_b + t) // block_size]``; a token whose block entry is
    outside [0, num_blocks) is dropped too."""
    nnew = k_new.shape[2]
    nmax = k_cache.shape[2] if block_table is None else block_table.shape[1] * k_cache.shape[2]
    dest = cache_seqlens.to(torch.int64)[:, None] + torch.arange(nnew, device=k_cache.device)[None, :]  # (B, Nnew)
    keep = (dest >= 0) & (dest < nmax)
    b_idx = torch.arange(k_new.shape[0], device=k_cache.device)[:, None].expand_as(dest)
    if block_table is not None:
        page = k_cache.shape[2]
        blocks = block_table.to(torch.int64)[b_idx, (dest.clamp(0, nmax - 1) // page)]  # (B, Nnew)
        keep = keep & (blocks >= 0) & (blocks < k_cache.shape[0])
        # The (block, offset) pairs play the (sequence, slot) pairs of the dense cache below.
        b_idx, dest = blocks, dest % page
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        # cache[b, :, dest] viewed as (B, Nmax, Hk, D) so one advanced index picks (b, slot) pairs.
        cache.transpose(1, 2)[b_idx[keep], dest[keep]] = new.transpose(1, 2)[keep]


# ------------------------------------------------------------------------------------------ custom ops
def _decode_fake(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left, window_right, num_splits,
                 block_table=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("genfast::attention_decode_triton", mutates_args=())
def _attention_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             cache_seqlens: torch.Tensor, causal: bool, scale: float, window_left: int,
                             window_right: int, num_splits: int,
                             block_table: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from genfast.kernels import attention_decode as kernels

    return kernels.attention_decode(q, k_cache, v_cache, cache_seqlens, causal, scale, window_left, window_right,
                                    num_splits, block_table)


_attention_decode_triton.register_fake(_decode_fake)
if _ext.loaded:  # the schemas genfast::attention_decode and kv_cache_append come with the extension (csrc/genfast.cpp)
    torch.library.register_fake("genfast::attention_decode")(_decode_fake)


@torch.library.custom_op("genfast::kv_cache_append_triton", mutates_args=("k_cache", "v_cache"))
def _kv_cache_append_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                            cache_seqlens: torch.Tensor, block_table: torch.Tensor | None = None) -> None:
    from genfast.kernels import attention_decode as kernels

    kernels.kv_cache_append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)


# The reference append selects the kept positions with boolean masks (data-dependent shapes), so it too is an
# opaque custom op: torch.compile(fullgraph=True) then sees one in-place op whatever the backend.
@torch.library.custom_op("genfast::kv_cache_append_torch", mutates_args=("k_cache", "v_cache"))
def _kv_cache_append_torch(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                           cache_seqlens: torch.Tensor, block_table: torch.Tensor | None = None) -> None:
    kv_cache_append_ref(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)


@_kv_cache_append_triton.register_fake
def _append_fake(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table=None):
    return None


_kv_cache_append_torch.register_fake(_append_fake)
if _ext.loaded:
    torch.library.register_fake("genfast::kv_cache_append")(_append_fake)


# ------------------------------------------------------------------------------------------ dispatch
def _head_dim_supports(device, dtype=None, head_dim=None, **_):
    if head_dim is not None and head_dim > TRITON_MAX_HEAD_DIM:
        return f"the decode kernels take head dims up to {TRITON_MAX_HEAD_DIM}, got {head_dim}"
    return None


def _triton_decode(q, k_cache, v_cache, cache_seqlens, causal, scale, left, right, num_splits, need_lse,
                   block_table=None):
    return torch.ops.genfast.attention_decode_triton(q, k_cache, v_cache, cache_seqlens, causal, scale, left, right,
                                                     num_splits, block_table)


def _compiled_decode(q, k_cache, v_cache, cache_seqlens, causal, scale, left, right, num_splits, need_lse,
                     block_table=None):
    """genfast::attention_decode: the CUDA kernel for CUDA tensors, the C++ CPU kernel for CPU ones."""
    return torch.ops.genfast.attention_decode(q, k_cache, v_cache, cache_seqlens, causal, scale, left, right,
                                              num_splits, block_table)


# The CUDA C++ kernel (csrc/cuda/attention.cu) serves calls that name the "cuda" backend; auto prefers Triton,
# whose kernels are the tested algorithm the C++ one mirrors.
_dispatch = _backend.dispatcher(OP, _reference, preference={"cuda": ("triton", "cuda"), "cpu": ("cpu",)})
_dispatch.register("triton", supports=_head_dim_supports)(_triton_decode)
_dispatch.register("cuda", supports=_head_dim_supports)(_compiled_decode)
_dispatch.register("cpu")(_compiled_decode)

_append_dispatch = _backend.dispatcher(APPEND, lambda *a: torch.ops.genfast.kv_cache_append_torch(*a),
                                       preference={"cuda": ("triton",), "cpu": ("cpu",)})
_append_dispatch.register("triton")(lambda *a: torch.ops.genfast.kv_cache_append_triton(*a))
_append_dispatch.register("cpu")(lambda *a: torch.ops.genfast.kv_cache_append(*a))


# ------------------------------------------------------------------------------------------ checks
def _check_cache(op: str, q, k_cache, v_cache, q_name: str = "q", paged: bool = False) -> None:
    _checks.tensor(op, q_name, q, dtypes=_checks.FLOAT_DTYPES, ndim=4)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _checks.tensor(op, name, t, dtypes=_checks.FLOAT_DTYPES, ndim=4)
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {q_name} has dtype {q.dtype}")
    _checks.same_device(op, q_name, q, k_cache=k_cache, v_cache=v_cache)
    _checks.same_shape(op, "k_cache", k_cache, v_cache=v_cache)
    if not paged and k_cache.shape[0] != q.shape[0]:  # a paged cache's dim 0 is its pool of blocks
        raise ValueError(f"{op}: k_cache has batch {k_cache.shape[0]} but {q_name} has batch {q.shape[0]}")
    if k_cache.shape[3] != q.shape[3]:
        raise ValueError(f"{op}: {q_name} and k_cache head dims differ: {q_name} has D={q.shape[3]}, "
                         f"k_cache has D={k_cache.shape[3]}")
    if q.shape[3] == 0:
        raise ValueError(f"{op}: the head dim D must be >= 1, got {q_name} shape {tuple(q.shape)}")
    if k_cache.shape[2] == 0:
        raise ValueError(f"{op}: k_cache must have room for at least one token (Nmax >= 1)")


def _check_block_table(op: str, block_table, k_cache: torch.Tensor, batch: int) -> int:
    """Checks a paged cache's block table and block size (no host sync); returns the logical capacity Nmax."""
    _checks.tensor(op, "block_table", block_table, dtypes=(torch.int32,), ndim=2)
    if block_table.shape[0] != batch:
        raise ValueError(f"{op}: block_table must hold one row of blocks per sequence (B={batch}), got shape "
                         f"{tuple(block_table.shape)}")
    if block_table.shape[1] == 0:
        raise ValueError(f"{op}: block_table must name at least one block per sequence, got shape "
                         f"{tuple(block_table.shape)}")
    if block_table.device != k_cache.device:
        raise ValueError(f"{op}: block_table is on {block_table.device} but the caches are on {k_cache.device}")
    page = k_cache.shape[2]
    if page not in PAGE_SIZES:
        raise ValueError(f"{op}: a paged k_cache is [num_blocks, Hk, block_size, D] with block_size a power of two "
                         f"from {PAGE_SIZES[0]} to {PAGE_SIZES[-1]}, got block_size={page} (shape "
                         f"{tuple(k_cache.shape)})")
    if k_cache.shape[0] == 0:
        raise ValueError(f"{op}: a paged k_cache must hold at least one block, got shape {tuple(k_cache.shape)}")
    return block_table.shape[1] * page


def _check_blocks_needed(op: str, block_table: torch.Tensor, num_blocks: int, page: int, lo: torch.Tensor,
                         hi: torch.Tensor) -> None:
    """Every entry of sequence b's row that covers a slot of [lo_b, hi_b) is in [0, num_blocks) (one host sync)."""
    if block_table.numel() == 0:
        return
    first = torch.arange(block_table.shape[1], device=block_table.device) * page  # first logical slot of each block
    needed = (first[None, :] < hi[:, None]) & (first[None, :] + page > lo[:, None])
    bad = needed & ((block_table < 0) | (block_table >= num_blocks))
    where = bad.nonzero()
    if where.numel():
        b, j = where[0].tolist()
        raise ValueError(f"{op}: block_table[{b}, {j}] = {int(block_table[b, j])} is not a block of the caches "
                         f"(0 <= block < num_blocks={num_blocks}), but sequence {b} needs its logical slots "
                         f"[{j * page}, {(j + 1) * page}) ({int(bad.sum())} such entries in all)")


def _check_distinct_slots(block_table: torch.Tensor, page: int, cache_seqlens: torch.Tensor, nnew: int) -> None:
    """The physical slots an append writes are all different (two sequences sharing a block they write would
    overwrite each other's tokens, in an order no backend defines). Called after ``_check_blocks_needed``."""
    if block_table.numel() == 0 or nnew == 0:
        return
    dest = cache_seqlens.to(torch.int64)[:, None] + torch.arange(nnew, device=block_table.device)[None, :]
    blocks = block_table.to(torch.int64).gather(1, dest // page)
    slots = (blocks * page + dest % page).flatten()
    if slots.unique().numel() != slots.numel():
        raise ValueError(f"{APPEND}: block_table maps two of the new tokens to one slot of the caches (a block "
                         "written by two sequences, or named twice in one row): each sequence's blocks that "
                         "receive tokens must be its own")


def _check_seqlens(op: str, cache_seqlens, batch: int, device: torch.device) -> None:
    _checks.tensor(op, "cache_seqlens", cache_seqlens, dtypes=SEQLEN_DTYPES, ndim=1)
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"{op}: cache_seqlens must hold one length per sequence (B={batch}), "
                         f"got shape {tuple(cache_seqlens.shape)}")
    if cache_seqlens.device != device:
        raise ValueError(f"{op}: cache_seqlens is on {cache_seqlens.device} but the caches are on {device}")


def _check_range(op: str, name: str, values: torch.Tensor, low: int, high: int, what: str) -> None:
    """``low <= values <= high`` element-wise, with one host synchronisation."""
    if values.numel() == 0:  # an empty batch has nothing to check
        return
    if values.device.type == "cpu" and values.numel() <= 4096:
        # On the CPU the sync is free and reading a batch's lengths costs less than the three ops of the reduction
        # (a decode step's check was a fifth of its call at small caches).
        listed = values.tolist()
        lo, hi = min(listed), max(listed)
    else:
        lo, hi = torch.stack([values.min(), values.max()]).tolist()
    if lo < low or hi > high:
        raise ValueError(f"{op}: {name} must be in [{low}, {high}] ({what}), got values in [{lo}, {hi}]")


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) bytes of memory ``t`` can touch (t non-empty, strides >= 0)."""
    first = t.data_ptr()
    last = first + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) * t.element_size()
    return first, last + t.element_size()


def _rows_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (a cache made with .expand, say). Conservative: the
    dims sorted by stride must each step over the whole extent of the ones below, as any dense layout does."""
    extent = 1
    for n, s in sorted(((n, s) for n, s in zip(t.shape, t.stride()) if n > 1), key=lambda p: p[1]):
        if s < extent:
            return True
        extent = s * n
    return False


def _check_no_aliasing(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.numel() and _rows_overlap(t):
            raise ValueError(f"{APPEND}: {name} has elements that share memory (strides {tuple(t.stride())}, "
                             "e.g. made with .expand): appends to one sequence would overwrite another; pass a "
                             "cache with its own memory per slot (.contiguous())")
    if torch.compiler.is_compiling():  # fake tensors have no memory to compare
        return
    if k_cache.numel() and k_cache.untyped_storage().data_ptr() == v_cache.untyped_storage().data_ptr():
        (k0, k1), (v0, v1) = _byte_span(k_cache), _byte_span(v_cache)
        if k0 < v1 and v0 < k1:
            raise ValueError(f"{APPEND}: k_cache and v_cache overlap in memory: the values would overwrite the "
                             "keys; give each its own tensor")


def _validate_flag(op: str, validate) -> bool:
    if not isinstance(validate, bool):
        raise TypeError(f"{op}: validate must be a bool, got {type(validate).__name__}")
    return validate and not torch.compiler.is_compiling()


# ------------------------------------------------------------------------------------------ public ops
def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor, *,
                     scale: float | None = None, causal: bool = True,
                     window: tuple[int | None, int | None] | None = None, return_lse: bool = False,
                     num_splits: int | None = None, batch_invariant: bool = False, validate: bool = True,
                     block_table: torch.Tensor | None = None):
    """Attention of Nq new tokens per sequence over a KV cache (see the module docstring for the semantics).

    q [B, Hq, Nq, D] with 1 <= Nq <= 16; k_cache, v_cache [B, Hk, Nmax, D] with Hk dividing Hq;
    cache_seqlens int32/int64 [B], each in [Nq, Nmax] (checked with one host sync when ``validate``).
    ``block_table`` int32 [B, max_blocks_per_seq]: the caches are paged, [num_blocks, Hk, block_size, D], and
    Nmax = max_blocks_per_seq * block_size (module docstring); with ``validate`` the entries each sequence needs
    are checked to name blocks of the caches (the same host sync).
    ``num_splits``: chunks each sequence's keys are cut into (split-K) on a GPU; None picks one that fills the GPU
    (on the CPU, one that fills the threads), which depends on the batch size.
    ``batch_invariant=True``: the split count is a function of Nmax, D and the dtype alone, so each row's output is
    bitwise the same whatever the batch size and the other rows' lengths (C++ CPU, Triton and CUDA kernels; the
    reference path, torch's SDPA, promises nothing). Off by default: it cost 1% to 12% on a CPU (README, Serving).
    Returns out [B, Hq, Nq, D] in q's dtype, and with ``return_lse`` also lse [B, Hq, Nq] float32 (natural log).
    """
    paged = block_table is not None
    _check_cache(OP, q, k_cache, v_cache, paged=paged)
    b, hq, nq, d = q.shape
    hk = k_cache.shape[1]
    nmax = _check_block_table(OP, block_table, k_cache, b) if paged else k_cache.shape[2]
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"{OP}: the number of query heads Hq={hq} must be a multiple of the cache's heads Hk={hk}")
    if not 1 <= nq <= MAX_NEW_TOKENS:
        raise ValueError(f"{OP}: q must hold 1 to {MAX_NEW_TOKENS} new tokens per sequence (Nq), got Nq={nq}")
    _check_seqlens(OP, cache_seqlens, b, q.device)
    causal = _flag(OP, "causal", causal)
    return_lse = _flag(OP, "return_lse", return_lse)
    scale = softmax_scale(OP, scale, d)
    # The backends (kernels and reference alike) take the window rule's resolved bounds, never -1.
    left, right, _ = window_bounds(causal, *_window_pair(OP, window), nq, nmax)
    batch_invariant = _flag(OP, "batch_invariant", batch_invariant)
    if batch_invariant and num_splits is not None:
        raise ValueError(f"{OP}: pass num_splits or batch_invariant=True, not both (batch_invariant fixes the "
                         f"split count from Nmax, D and the dtype), got num_splits={num_splits!r}")
    if num_splits is None:
        num_splits = INVARIANT_SPLITS if batch_invariant else 0
    elif isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 1:
        raise ValueError(f"{OP}: num_splits must be None or an int >= 1, got {num_splits!r}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        raise ValueError(f"{OP}: inference only (no gradient); q, k_cache and v_cache must not require grad "
                         "(use torch.no_grad(), or genfast.ops.attention for training)")
    if _validate_flag(OP, validate):
        _check_range(OP, "cache_seqlens", cache_seqlens, nq, nmax,
                     "each sequence's length, its Nq new tokens included, at most the cache size Nmax")
        if paged:  # the blocks the rows can see: [first key of the window, length)
            length = cache_seqlens.to(torch.int64)
            lo = (length - nq - left).clamp(min=0)  # left is resolved: a finite bound
            _check_blocks_needed(OP, block_table, k_cache.shape[0], k_cache.shape[2], lo, length)
    out, lse = _dispatch(q, k_cache, v_cache, cache_seqlens, causal, scale, left, right, int(num_splits), return_lse,
                         block_table, device=q.device, dtype=q.dtype, facts={"head_dim": d})
    return (out, lse) if return_lse else out


def kv_cache_append(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                    cache_seqlens: torch.Tensor, *, validate: bool = True,
                    block_table: torch.Tensor | None = None) -> None:
    """Write new keys/values into the caches in place at each sequence's end; returns None.

    k_cache, v_cache [B, Hk, Nmax, D]; k_new, v_new [B, Hk, Nnew, D] of the caches' dtype and device;
    cache_seqlens int32/int64 [B], the current lengths: ``cache[b, :, L_b + t] = new[b, :, t]``.
    ``cache_seqlens`` is not changed (advance it by Nnew yourself). With ``validate`` (one host sync) an
    overflow (``L_b + Nnew > Nmax``) or a negative length raises; without it the tokens whose slot ``L_b + t`` falls
    outside [0, Nmax) are dropped and the others written (every backend alike).
    Caches whose slots share memory (made with ``.expand``) or that overlap each other raise ValueError.
    Paged (``block_table`` int32 [B, max_blocks_per_seq], caches [num_blocks, Hk, block_size, D]): logical slot
    ``L_b + t`` of sequence b (module docstring); with ``validate`` the blocks written must be blocks of the caches
    and no two new tokens may land in one slot; without it, tokens headed for an entry outside [0, num_blocks) are
    dropped.
    """
    paged = block_table is not None
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        _check_cache(APPEND, t, k_cache, v_cache, q_name=name, paged=paged)
        if t.shape[1] != k_cache.shape[1]:
            raise ValueError(f"{APPEND}: {name} has {t.shape[1]} heads but the caches have Hk={k_cache.shape[1]}")
    _checks.same_shape(APPEND, "k_new", k_new, v_new=v_new)
    batch = k_new.shape[0]
    _check_seqlens(APPEND, cache_seqlens, batch, k_cache.device)
    nmax = _check_block_table(APPEND, block_table, k_cache, batch) if paged else k_cache.shape[2]
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{APPEND}: {name} must not require grad (it is written in place)")
    _check_no_aliasing(k_cache, v_cache)
    if _validate_flag(APPEND, validate):
        nnew = k_new.shape[2]
        _check_range(APPEND, "cache_seqlens", cache_seqlens, 0, nmax - nnew,
                     f"the cache of Nmax={nmax} slots must have room for the Nnew={nnew} new tokens")
        if paged:
            length = cache_seqlens.to(torch.int64)
            _check_blocks_needed(APPEND, block_table, k_cache.shape[0], k_cache.shape[2], length, length + nnew)
            _check_distinct_slots(block_table, k_cache.shape[2], cache_seqlens, nnew)
    _append_dispatch(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, device=k_cache.device,
                     dtype=k_cache.dtype)


# ------------------------------------------------------------------------------------------ trusted callers
def append_to_checked_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                            cache_seqlens: torch.Tensor, block_table: torch.Tensor | None = None) -> None:
    """``kv_cache_append(..., validate=False)`` without the argument checks, for a caller that guarantees what
    they check (genfast.nn.KVCache: caches it allocated itself, new keys checked at each append). A decode step
    calls this once per layer per token, where the checks would cost more than the copy."""
    _append_dispatch(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, device=k_cache.device,
                     dtype=k_cache.dtype)


def decode_checked_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         cache_seqlens: torch.Tensor, block_table: torch.Tensor | None = None) -> torch.Tensor:
    """``attention_decode(q, k_cache, v_cache, cache_seqlens, validate=False)`` (causal, default scale) without the
    argument checks, for the same callers as ``append_to_checked_cache``."""
    d = q.shape[3]
    splits = INVARIANT_SPLITS if _batch_invariant else 0
    nmax = k_cache.shape[2] if block_table is None else block_table.shape[1] * k_cache.shape[2]
    left, right, _ = window_bounds(True, -1, -1, q.shape[2], nmax)
    out, _ = _dispatch(q, k_cache, v_cache, cache_seqlens, True, 1.0 / d ** 0.5, left, right, splits, False,
                       block_table, device=q.device, dtype=q.dtype, facts={"head_dim": d})
    return out


@contextlib.contextmanager
def batch_invariant_decode(enabled: bool = True):
    """Within the block, genfast.nn's KV-cache decode (``decode_checked_cache``) runs with ``batch_invariant``
    (GPT.generate(seed=...) uses it). Process-wide while the block runs (a global: see ``_batch_invariant``)."""
    global _batch_invariant
    before, _batch_invariant = _batch_invariant, bool(enabled)
    try:
        yield
    finally:
        _batch_invariant = before


__all__ = ["attention_decode", "attention_decode_ref", "kv_cache_append", "kv_cache_append_ref", "decode_allowed",
           "paged_to_dense"]
