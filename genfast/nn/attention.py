"""Drop-in attention modules on genfast.ops.attention.

- ``MultiheadAttention``: a subclass of torch.nn.MultiheadAttention (same arguments, parameters, state_dict,
  forward signature and semantics). ``need_weights=False`` runs the fused op; ``need_weights=True`` (torch's
  default) writes the softmax out, because the weights it returns are exactly the N x N matrix the fused path
  never holds.
- ``CausalSelfAttention``: the GPT block's attention (nanoGPT names ``c_attn``/``c_proj``), with a ``KVCache`` for
  generation. Attention of new tokens against the cache goes through one seam, ``attend_cached``
  (genfast.ops.attention_decode when decoding; appends through genfast.ops.kv_cache_append).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from genfast import ops
from genfast.ops.attention_decode import MAX_NEW_TOKENS as DECODE_MAX_NEW_TOKENS
from genfast.ops.attention_decode import PAGE_SIZES, append_to_checked_cache, decode_checked_cache, paged_to_dense

_MHA = "MultiheadAttention"
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ------------------------------------------------------------------------------------------- masks
def _top_left_causal(nq: int, nk: int, device) -> torch.Tensor:
    """Bool [Nq, Nk], True = attend: torch's is_causal (query i sees keys j <= i, aligned top-left)."""
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril()


def _keep_mask(attn_mask, key_padding_mask, b: int, h: int, nq: int, nk: int, dtype) -> torch.Tensor | None:
    """torch's two masks merged into one that genfast.ops.attention takes, broadcastable to [B, H, Nq, Nk].

    torch's bool masks say True = *masked out*; genfast's (like SDPA's) say True = *attend*, so bool masks are
    inverted. Two bool masks stay bool (AND of the keeps); any float mask makes the result additive, a bool one
    then contributing -inf where masked, which is what torch's _canonical_mask does before adding.
    """
    parts = []
    if attn_mask is not None:
        parts.append(attn_mask.view(b, h, nq, nk) if attn_mask.dim() == 3 else attn_mask.view(1, 1, nq, nk))
    if key_padding_mask is not None:
        parts.append(key_padding_mask.view(b, 1, 1, nk))
    if not parts:
        return None
    if all(p.dtype == torch.bool for p in parts):
        keep = ~parts[0]
        for p in parts[1:]:
            keep = keep & ~p
        return keep
    total = None
    for p in parts:
        p = torch.zeros(p.shape, dtype=dtype, device=p.device).masked_fill(p, -math.inf) if p.dtype == torch.bool \
            else p.to(dtype)
        total = p if total is None else total + p
    return total


def _pad_keys(mask: torch.Tensor | None, extra: int) -> torch.Tensor | None:
    """Extend a merged mask by ``extra`` always-visible keys (add_bias_kv / add_zero_attn append keys)."""
    if mask is None or extra == 0:
        return mask
    fill = torch.ones if mask.dtype == torch.bool else torch.zeros
    return torch.cat([mask, fill(*mask.shape[:-1], extra, dtype=mask.dtype, device=mask.device)], dim=-1)


# ------------------------------------------------------------------------------------------- MultiheadAttention
class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose attention runs in genfast's fused kernel when ``need_weights=False``.

    Constructor, parameters (``in_proj_weight`` or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when
    kdim/vdim differ from embed_dim, ``in_proj_bias``, ``bias_k``/``bias_v``, ``out_proj``) and state_dict are
    torch's, so checkpoints load both ways; ``isinstance(m, torch.nn.MultiheadAttention)`` holds.

    forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (out, weights or None), with torch's shapes and semantics:
    query [L, B, E] (or [B, L, E] with batch_first, or unbatched [L, E]), key [S, B, kdim], value [S, B, vdim];
    key_padding_mask [B, S] and attn_mask [L, S] or [B*H, L, S], bool (True = masked out) or float (added);
    ``is_causal`` a hint that attn_mask is the causal mask (unlike torch, attn_mask may then be omitted).
    Weights: [B, L, S] averaged over heads, or [B, H, L, S] with ``average_attn_weights=False``.

    **need_weights=False is the fast path** (O(N) memory, fused kernel); torch's default need_weights=True is kept
    for drop-in fidelity and computes the full softmax to return it. A row whose keys are all masked gives 0 on
    the fast path (torch's SDPA paths do the same) and NaN with need_weights=True (as torch's weights do).
    fp64 inputs take the written-out path either way (the fused op serves fp32, fp16 and bf16).
    """

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> "MultiheadAttention":
        """A genfast module sharing ``mha``'s parameter objects (no copy: optimizers built before keep working)."""
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None,
                  add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
                  batch_first=mha.batch_first, device="meta", dtype=mha.out_proj.weight.dtype)
        for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k",
                     "bias_v"):
            setattr(new, name, getattr(mha, name))
        new.out_proj = mha.out_proj
        new.train(mha.training)
        return new

    # A printed model names genfast and what it stands in for, so a genfast.fuse(...) result shows what it replaced.
    def _get_name(self) -> str:
        return "genfast.MultiheadAttention"

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, drop-in for torch.nn.MultiheadAttention"

    # torch's own forward has its own fast path (eval, no grad); ours replaces both of its paths.
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = self._check(query, key, value, key_padding_mask, attn_mask)
        self_attention = query is key and key is value
        if not batched:  # unbatched: a batch of one, squeezed again at the end
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # work in [B, N, E]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, nq, e = query.shape
        h, d, nk = self.num_heads, self.head_dim, key.shape[1]

        q, k, v = self._project(query, key, value, self_attention)  # (B, H, N, D) each
        if is_causal and attn_mask is None:
            attn_mask = ~_top_left_causal(nq, nk, query.device)  # torch's convention: True = masked out
        # torch trusts the is_causal hint (ignores the mask's values) when no padding mask is merged in and no
        # weights are returned; genfast's causal is aligned bottom-right, torch's top-left: the same only if Nq == Nk.
        use_causal = is_causal and key_padding_mask is None and not need_weights and nq == nk
        mask = None if use_causal else _keep_mask(attn_mask, key_padding_mask, b, h, nq, nk, query.dtype)
        extra = 0
        if self.bias_k is not None:  # one learned key/value appended to every sequence
            k = torch.cat([k, self.bias_k.view(1, h, 1, d).expand(b, h, 1, d)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, h, 1, d).expand(b, h, 1, d)], dim=2)
            extra += 1
        if self.add_zero_attn:  # one all-zero key/value appended after the projection
            k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
            extra += 1
        if extra and use_causal:  # the appended keys break the causal hint's square shape: spell the mask out
            use_causal, mask = False, _keep_mask(attn_mask, None, b, h, nq, nk, query.dtype)
        mask = _pad_keys(mask, extra)
        dropout_p = self.dropout if self.training else 0.0

        weights = None
        if need_weights:
            out, weights = self._attention_with_weights(q, k, v, mask, dropout_p)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        elif q.dtype == torch.float64:  # the fused op takes fp32/fp16/bf16; torch's MHA also takes fp64
            out = self._attention_with_weights(q, k, v, mask if not use_causal else
                                               _top_left_causal(nq, k.shape[2], q.device), dropout_p)[0]
        else:
            out = ops.attention(q, k, v, causal=use_causal, attn_mask=mask, dropout_p=dropout_p)
        out = self.out_proj(out.transpose(1, 2).reshape(b, nq, e))  # (B, L, E)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _project(self, query, key, value, self_attention: bool):
        """The input projections, reshaped (B, N, E) -> (B, H, N, D)."""
        bias = self.in_proj_bias
        bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)
        if self._qkv_same_embed_dim:
            if self_attention:  # one GEMM for all three, as torch does
                q, k, v = F.linear(query, self.in_proj_weight, bias).chunk(3, dim=-1)
            else:
                wq, wk, wv = self.in_proj_weight.chunk(3)
                q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)
        else:
            q = F.linear(query, self.q_proj_weight, bq)
            k = F.linear(key, self.k_proj_weight, bk)
            v = F.linear(value, self.v_proj_weight, bv)
        heads = lambda t: t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # noqa: E731
        return heads(q), heads(k), heads(v)

    def _attention_with_weights(self, q, k, v, mask, dropout_p):
        """The reference path: softmax written out so the weights [B, H, L, S] can be returned (post-dropout, as
        torch returns them)."""
        s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
        p = torch.softmax(s, dim=-1)
        if dropout_p > 0:
            p = F.dropout(p, dropout_p)
        return p @ v, p

    def _check(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        """Validate the arguments (errors name them); returns whether the input is batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{_MHA}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _FLOATS:
                raise TypeError(f"{_MHA}: {name} must be a floating tensor, got {t.dtype}")
            if t.device != query.device:
                raise ValueError(f"{_MHA}: {name} is on {t.device} but query is on {query.device}")
            if t.dtype != query.dtype:
                raise TypeError(f"{_MHA}: {name} has dtype {t.dtype} but query has dtype {query.dtype}")
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"{_MHA}: query, key and value must all be 3-D (batched) or 2-D (unbatched), got "
                             f"shapes {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
        batched = query.dim() == 3
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != width:
                raise ValueError(f"{_MHA}: {name} must have {width} features in its last dim, got shape "
                                 f"{tuple(t.shape)}")
        bdim = (0 if self.batch_first else 1) if batched else None
        sdim = (1 if self.batch_first else 0) if batched else 0
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"{_MHA}: key {tuple(key.shape)} and value {tuple(value.shape)} must agree in every "
                             "dim but the last")
        b = query.shape[bdim] if batched else 1
        if batched and key.shape[bdim] != b:
            raise ValueError(f"{_MHA}: key has batch {key.shape[bdim]} but query has batch {b}")
        nq, nk = query.shape[sdim], key.shape[sdim]
        for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if m is None:
                continue
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"{_MHA}: {name} must be a torch.Tensor or None, got {type(m).__name__}")
            if m.dtype != torch.bool and m.dtype not in _FLOATS:
                raise TypeError(f"{_MHA}: {name} must be bool (True = masked out) or float (added), got {m.dtype}")
            if m.device != query.device:
                raise ValueError(f"{_MHA}: {name} is on {m.device} but query is on {query.device}")
        if key_padding_mask is not None:
            want = (b, nk) if batched else (nk,)
            if tuple(key_padding_mask.shape) != want:
                raise ValueError(f"{_MHA}: key_padding_mask must have shape {list(want)} ([B, S]), got "
                                 f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            if tuple(attn_mask.shape) not in ((nq, nk), (b * self.num_heads, nq, nk)):
                raise ValueError(f"{_MHA}: attn_mask must have shape [L, S] = {[nq, nk]} or [B*num_heads, L, S] = "
                                 f"{[b * self.num_heads, nq, nk]}, got {tuple(attn_mask.shape)}")
        return batched


# ------------------------------------------------------------------------------------------- KV cache
class KVCache:
    """Keys and values of the tokens seen so far, preallocated: k, v [B, H, Nmax, D] and ``lengths`` [B] int64.

    ``append`` writes T new tokens after each sequence's current length (sequences may start at different
    lengths, for prompts of different lengths). The shapes never change and ``lengths`` is one device tensor
    updated in place, so a decode step over the cache is the same computation at every token (capturable as a
    CUDA graph). ``bound`` is a host-side upper bound on ``lengths`` (so that appending needs no GPU
    synchronisation): overflow is checked against it, and a prefill reads the cache only up to it.

    Paged (``block_size=`` 16..256, a power of two): k, v are a pool [num_blocks, H, block_size, D] and
    ``block_table`` int32 [B, ceil(max_seq_len / block_size)] names each sequence's blocks (the layout of
    genfast.ops.attention_decode's ``block_table``). ``capacity`` (host ints [B], each <= max_seq_len; default
    max_seq_len each) is how many tokens sequence b will ever hold: it gets ceil(capacity_b / block_size) blocks,
    its later entries are -1, and the pool holds only the blocks handed out, so memory follows the sequences'
    own sizes rather than B times the longest. Appending past a sequence's capacity is an error. Decoding reads
    the same logical slots as the dense cache would, with the same arithmetic (bitwise the same result on the
    C++ CPU and Triton kernels; tests/test_paged_kv_cache.py).
    """

    def __init__(self, batch_size: int, num_heads: int, max_seq_len: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device=None, lengths: torch.Tensor | list[int] | None = None,
                 block_size: int | None = None, capacity: list[int] | None = None):
        for name, n in (("batch_size", batch_size), ("num_heads", num_heads), ("max_seq_len", max_seq_len),
                        ("head_dim", head_dim)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"KVCache: {name} must be an int >= 1, got {n!r}")
        self._max_seq_len = max_seq_len
        self.block_table: torch.Tensor | None = None
        if block_size is None:
            if capacity is not None:
                raise ValueError("KVCache: capacity needs a paged cache (block_size=...)")
            self.k = torch.zeros(batch_size, num_heads, max_seq_len, head_dim, dtype=dtype, device=device)
            self._capacity = None
        else:
            self._capacity = self._check_capacity(capacity, batch_size, max_seq_len)
            self.k, self.block_table = self._allocate(block_size, num_heads, head_dim, dtype, device)
        self.v = torch.zeros_like(self.k)
        device = self.k.device
        if lengths is None:
            self.lengths = torch.zeros(batch_size, dtype=torch.int64, device=device)
            self.bound = 0
            self._limit = self._limit_for([0] * batch_size, 0)
        else:
            lengths = torch.as_tensor(lengths, dtype=torch.int64, device=device).clone()
            if lengths.shape != (batch_size,):
                raise ValueError(f"KVCache: lengths must have shape [{batch_size}], got {tuple(lengths.shape)}")
            listed = lengths.tolist()  # one sync, at construction only
            lo, hi = min(listed), max(listed)
            if lo < 0 or hi > max_seq_len:
                raise ValueError(f"KVCache: lengths must lie in [0, max_seq_len={max_seq_len}], got {listed}")
            self.lengths, self.bound = lengths, hi
            self._limit = self._limit_for(listed, hi)
            if self._limit < hi:
                raise ValueError(f"KVCache: lengths {listed} exceed the capacities {self._capacity}")

    @staticmethod
    def _check_capacity(capacity, batch_size: int, max_seq_len: int) -> list[int]:
        if capacity is None:
            return [max_seq_len] * batch_size
        if (not isinstance(capacity, (list, tuple)) or len(capacity) != batch_size
                or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= max_seq_len for c in capacity)):
            raise ValueError(f"KVCache: capacity must be {batch_size} ints in [0, max_seq_len={max_seq_len}], "
                             f"got {capacity!r}")
        return list(capacity)

    def _allocate(self, block_size, num_heads: int, head_dim: int, dtype, device):
        """The pool of the blocks the capacities need, dealt to the sequences in order, and the table naming them."""
        if isinstance(block_size, bool) or block_size not in PAGE_SIZES:
            raise ValueError(f"KVCache: block_size must be None (a dense cache) or one of {PAGE_SIZES}, got "
                             f"{block_size!r}")
        per_seq = -(-self._max_seq_len // block_size)
        table = torch.full((len(self._capacity), per_seq), -1, dtype=torch.int32)
        used = 0
        for b, cap in enumerate(self._capacity):
            n = -(-cap // block_size)
            table[b, :n] = torch.arange(used, used + n, dtype=torch.int32)
            used += n
        # At least one block: the kernels clamp entries into the pool, which must not be empty.
        pool = torch.zeros(max(used, 1), num_heads, block_size, head_dim, dtype=dtype, device=device)
        return pool, table.to(pool.device)

    def _limit_for(self, lengths: list[int], bound: int) -> int:
        """The host bound past which an append would overflow some sequence: ``bound`` plus the least room left.
        Appends move every length and ``bound`` alike, so it stays put until the lengths are set again."""
        if self._capacity is None:
            return self._max_seq_len
        return bound + min(cap - n for cap, n in zip(self._capacity, lengths))

    @property
    def max_seq_len(self) -> int:
        return self._max_seq_len

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def num_heads(self) -> int:
        return self.k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k.shape[3]

    @property
    def block_size(self) -> int | None:
        return None if self.block_table is None else self.k.shape[2]

    def prefix(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [0, n) of every sequence, [B, H, n, D] (a view of a dense cache, a gathered copy
        of a paged one; slots a sequence has no block for hold another block's data: mask them)."""
        if self.block_table is None:
            return self.k[:, :, :n], self.v[:, :, :n]
        table = self.block_table[:, :-(-n // self.k.shape[2])]
        return paged_to_dense(self.k, table)[:, :, :n], paged_to_dense(self.v, table)[:, :, :n]

    def decode(self, q: torch.Tensor) -> torch.Tensor:
        """attention_decode of q [B, H, T<=16, D] (already appended) over the cache, unchecked (KVCache's own)."""
        return decode_checked_cache(q, self.k, self.v, self.lengths, self.block_table)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [B, H, T, D] at positions lengths[b] .. lengths[b] + T - 1 of each sequence b."""
        b, h, d = self.batch_size, self.num_heads, self.head_dim
        if k.shape != v.shape or k.dim() != 4 or k.shape[:2] != (b, h) or k.shape[3] != d:
            raise ValueError(f"KVCache.append: k and v must both be [B, H, T, D] = "
                             f"[{b}, {h}, T, {d}], got {tuple(k.shape)} "
                             f"and {tuple(v.shape)}")
        if k.device != self.k.device or v.device != self.k.device:
            raise ValueError(f"KVCache.append: k and v must be on the cache's device {self.k.device}, got "
                             f"{k.device} and {v.device}")
        t = k.shape[2]
        if self.bound + t > self._limit:
            room = "max_seq_len" if self._capacity is None else "a sequence's capacity, or max_seq_len"
            raise ValueError(f"KVCache.append: {t} new tokens after up to {self.bound} overflow {room}="
                             f"{self._limit if self._capacity is not None else self.max_seq_len}")
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # The fused append is inference-only (no autograd); indexed assignment keeps the graph.
            pos = self.lengths[:, None] + torch.arange(t, device=self.k.device)  # (B, T)
            rows = torch.arange(k.shape[0], device=self.k.device)[:, None]
            if self.block_table is not None:  # the (block, offset) of each logical slot
                page = self.k.shape[2]
                rows, pos = self.block_table.to(torch.int64)[rows, pos // page], pos % page
            # Advanced indexing on dims 0 and 2 puts (B, T) first: the source is laid out (B, T, H, D).
            self.k[rows, :, pos] = k.transpose(1, 2)
            self.v[rows, :, pos] = v.transpose(1, 2)
        else:
            # The cache's own tensors and the checks above are everything kv_cache_append checks, and the host-side
            # bound rules out an overflow without a GPU sync: the unchecked entry point saves its checks per token.
            append_to_checked_cache(self.k, self.v, k, v, self.lengths, self.block_table)
        self.lengths += t
        self.bound += t

    def set_lengths(self, lengths: torch.Tensor, bound: int | None = None) -> None:
        """Forget every token of sequence b from position ``lengths[b]`` on (later appends overwrite them).

        ``lengths`` int [B], each in [0, max_seq_len] (checked, with one host synchronisation); the host-side
        ``bound`` follows it (``max(lengths)``), or is ``bound`` where given, which must then be at least that.
        A batched generation uses this once, after prefilling right-padded prompts of different lengths.
        ``lengths`` is copied into the cache's own tensor, in place (a captured decode step keeps reading it).
        """
        op = "KVCache.set_lengths"
        if not isinstance(lengths, torch.Tensor) or lengths.shape != self.lengths.shape:
            raise ValueError(f"{op}: lengths must be a tensor of shape {list(self.lengths.shape)}, got "
                             f"{tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__}")
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"{op}: lengths must hold integers, got {lengths.dtype}")
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)):
            raise ValueError(f"{op}: bound must be None or an int, got {bound!r}")
        listed = lengths.to(torch.int64).tolist()  # one sync, once per generation
        lo, hi = min(listed), max(listed)
        if lo < 0 or hi > self.max_seq_len:
            raise ValueError(f"{op}: lengths must lie in [0, max_seq_len={self.max_seq_len}], got values in "
                             f"[{lo}, {hi}]")
        if bound is not None and not hi <= bound <= self.max_seq_len:
            raise ValueError(f"{op}: bound must be an int in [max(lengths)={hi}, {self.max_seq_len}], got {bound}")
        bound = hi if bound is None else bound
        limit = self._limit_for(listed, bound)
        if limit < bound:
            raise ValueError(f"{op}: lengths {listed} exceed the sequences' capacities {self._capacity}")
        self.lengths.copy_(lengths)  # in place: caches of different layers each keep their own tensor
        self.bound, self._limit = bound, limit


def attend_cached(q: torch.Tensor, cache: KVCache, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of T new queries q [B, H, T, D] over ``cache``, which already holds them as its last T tokens.

    Query t of sequence b sits at position lengths[b] - T + t and sees the keys at positions <= its own. Up to
    16 new tokens without gradient or dropout (decoding) go through genfast.ops.attention_decode over the whole
    cache: static shapes, the per-row lengths read on the device (the kernels read only the visible slots), so
    every decode step is the same computation. A longer prefill, or a call that needs gradients, runs
    genfast.ops.attention over the cached prefix up to the host-side bound, with a per-sequence mask.
    """
    b, h, t, d = q.shape
    if (b, h, d) != (cache.batch_size, cache.num_heads, cache.head_dim) or q.device != cache.k.device:
        raise ValueError(f"attend_cached: q must be [B, H, T, D] = [{cache.batch_size}, {cache.num_heads}, T, "
                         f"{cache.head_dim}] on {cache.k.device}, got {tuple(q.shape)} on {q.device}")
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or cache.k.requires_grad)
    if 1 <= t <= DECODE_MAX_NEW_TOKENS and dropout_p == 0.0 and not needs_grad:
        # Shapes checked above, the cache is KVCache's own and lengths >= T holds by construction (the queries
        # were just appended): attention_decode's checks would only repeat these, and its value check would sync.
        return cache.decode(q.to(cache.k.dtype)).to(q.dtype)
    n = cache.bound
    k, v = cache.prefix(n)
    j = torch.arange(n, device=q.device)
    last = cache.lengths[:, None] - t + torch.arange(t, device=q.device)  # (B, T): each query's own position
    keep = (j[None, None, :] <= last[:, :, None])[:, None]  # (B, 1, T, n)
    return ops.attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=keep, dropout_p=dropout_p)


def capture_decode_step(step: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...],
                        caches: list[KVCache]) -> Callable[..., torch.Tensor]:
    """``step(*inputs) -> Tensor``, a decode step of fixed shapes whose state is ``caches``, captured as a CUDA graph.

    Returns ``replay(*args)``: copies ``args`` into ``inputs`` (the static input buffers, on the GPU), replays the
    graph and returns its output tensor (overwritten by the next replay). The step must not synchronise with the
    host. Warming up (which compiles kernels and allocates workspaces) appends one token to every cache: their
    lengths and host bounds are put back afterwards, and the slot written is overwritten by the first real step.
    """
    device = inputs[0].device
    saved = [(cache.lengths.clone(), cache.bound) for cache in caches]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step(*inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    for cache, (lengths, bound) in zip(caches, saved):
        cache.lengths.copy_(lengths)
        cache.bound = bound
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step(*inputs)
    for cache, (_, bound) in zip(caches, saved):
        cache.bound = bound  # the capture ran append's Python (bound += T) but no kernel

    def replay(*args: torch.Tensor) -> torch.Tensor:
        for buffer, arg in zip(inputs, args):
            buffer.copy_(arg)
        graph.replay()
        return output

    return replay


# ------------------------------------------------------------------------------------------- CausalSelfAttention
class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention of a GPT block (nanoGPT's layout: ``c_attn`` -> q, k, v; ``c_proj``).

    forward(x [B, T, C], kv_cache=None) -> [B, T, C]. Without a cache: causal attention over x. With a
    ``KVCache`` (from ``new_cache``): x holds the T *new* tokens; their keys and values are appended to the cache
    and they attend to everything cached before them, so feeding a sequence in pieces gives the same outputs as
    feeding it whole.
    """

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True, max_seq_len: int = 1024,
                 device=None, dtype=None):
        super().__init__()
        if n_head < 1 or n_embd % n_head != 0:
            raise ValueError(f"CausalSelfAttention: n_embd={n_embd} must be a multiple of n_head={n_head}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"CausalSelfAttention: dropout must be in [0, 1), got {dropout}")
        self.n_embd, self.n_head, self.dropout, self.max_seq_len = n_embd, n_head, dropout, max_seq_len
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias, device=device, dtype=dtype)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias, device=device, dtype=dtype)
        self.resid_dropout = nn.Dropout(dropout)

    def new_cache(self, batch_size: int, max_seq_len: int | None = None, *, dtype=None, device=None,
                  lengths=None) -> KVCache:
        w = self.c_attn.weight
        return KVCache(batch_size, self.n_head, max_seq_len or self.max_seq_len, self.n_embd // self.n_head,
                       dtype=dtype or w.dtype, device=device or w.device, lengths=lengths)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.n_embd:
            raise ValueError(f"CausalSelfAttention: x must be [B, T, C] with C={self.n_embd}, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if kv_cache is None:
            y = ops.attention(q, k, v, causal=True, dropout_p=dropout_p)
        else:
            if kv_cache.batch_size != b:
                raise ValueError(f"CausalSelfAttention: kv_cache holds {kv_cache.batch_size} sequences, x has {b}")
            kv_cache.append(k, v)
            y = self.attend_cached(q, kv_cache, dropout_p)
        y = y.transpose(1, 2).contiguous().view(b, t, c)  # re-assemble the heads side by side
        return self.resid_dropout(self.c_proj(y))

    def attend_cached(self, q: torch.Tensor, kv_cache: KVCache, dropout_p: float = 0.0) -> torch.Tensor:
        """The seam for a decode kernel: attention of the new queries q [B, nh, T, hs] over the cache."""
        return attend_cached(q, kv_cache, dropout_p)


__all__ = ["MultiheadAttention", "CausalSelfAttention", "KVCache", "attend_cached", "capture_decode_step"]
