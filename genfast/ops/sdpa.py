"""``genfast.ops.scaled_dot_product_attention``: torch's signature and semantics, genfast's attention underneath.

A true drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (swap the import, keep the call):

- query [..., L, E], key [..., S, E], value [..., S, E]: any number of leading dims (they are folded into a
  batch; the dim before L is the heads dim, as torch's ``enable_gqa`` reads it; a 3-D call has one head). The
  one difference: value's last dim must equal E (genfast's kernels take one head dim), else a ValueError.
- ``is_causal`` is torch's: aligned top-left (query i sees keys j <= i), which differs from genfast's
  bottom-right ``causal`` only when L != S; there it is a mask. As in torch, ``attn_mask`` with ``is_causal``
  is refused.
- ``enable_gqa=False`` with different head counts is refused, as torch refuses it (here a ValueError naming
  ``enable_gqa``, where torch raises a RuntimeError about sizes); with ``enable_gqa=True`` query head h reads
  key/value head h // (Hq // Hk).
- ``dropout_p`` applies whenever it is > 0 (torch has no training flag here either), the seed drawn from torch's
  default generator, so ``torch.manual_seed`` makes it reproducible.
- genfast's rule where torch's CPU kernel differs: a query row holding a NaN gives NaN (torch's CPU kernel
  gives 0); a row that sees no key gives 0.
"""

from __future__ import annotations

import torch

from genfast.ops import _checks
from genfast.ops.attention import attention

OP = "scaled_dot_product_attention"


def _folded(name: str, t: torch.Tensor) -> torch.Tensor:
    """[..., H, N, E] (or [N', N, E] for 3-D, one head) as 4-D [B, H, N, E], a view where strides allow."""
    if t.dim() == 3:
        return t.unsqueeze(1)
    if t.dim() == 4:
        return t
    return t.reshape((-1,) + tuple(t.shape[-3:]))


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, *, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """torch's ``F.scaled_dot_product_attention``, served by :func:`genfast.ops.attention` (module docstring).

    Returns [..., L, E] in query's dtype, differentiable in query, key and value.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        _checks.tensor(OP, name, t, min_ndim=3)
    if not isinstance(is_causal, bool):
        raise TypeError(f"{OP}: is_causal must be a bool, got {type(is_causal).__name__}")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"{OP}: enable_gqa must be a bool, got {type(enable_gqa).__name__}")
    if key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(f"{OP}: query, key and value must have the same number of dims, got "
                         f"{query.dim()}, {key.dim()} and {value.dim()}")
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-2] != value.shape[:-2]:
        raise ValueError(f"{OP}: the leading dims of query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                         f"{tuple(value.shape)} must match")
    if value.shape[-1] != key.shape[-1]:
        raise ValueError(f"{OP}: value's last dim ({value.shape[-1]}) must equal key's ({key.shape[-1]}): genfast's "
                         "kernels take one head dim")
    if query.dim() >= 4 and query.shape[-3] != key.shape[-3] and not enable_gqa:
        raise ValueError(f"{OP}: query has {query.shape[-3]} heads but key has {key.shape[-3]}: pass enable_gqa=True "
                         "for grouped-query attention (torch refuses it too)")
    if is_causal and attn_mask is not None:
        raise ValueError(f"{OP}: attn_mask must be None when is_causal=True (as in torch)")
    q, k, v = _folded("query", query), _folded("key", key), _folded("value", value)
    causal = is_causal
    if is_causal and q.shape[2] != k.shape[2]:
        # torch's is_causal is top-left; genfast's causal is bottom-right: they agree only when L == S.
        attn_mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        causal = False
    elif attn_mask is not None:
        _checks.tensor(OP, "attn_mask", attn_mask)
        if query.dim() == 3 and attn_mask.dim() == 3:  # (N', L, S) against the folded [N', 1, L, S]
            attn_mask = attn_mask.unsqueeze(1)
        elif query.dim() > 4 and attn_mask.dim() > 2:
            try:
                attn_mask = attn_mask.expand(tuple(query.shape[:-1]) + (key.shape[-2],))
            except RuntimeError:
                raise ValueError(f"{OP}: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                                 f"{tuple(query.shape[:-1]) + (key.shape[-2],)}") from None
            attn_mask = attn_mask.reshape((-1,) + tuple(attn_mask.shape[-3:]))
    out = attention(q, k, v, causal=causal, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    return out.reshape(query.shape) if out.shape != query.shape else out


__all__ = ["scaled_dot_product_attention"]
