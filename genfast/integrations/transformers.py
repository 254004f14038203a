"""genfast inside Hugging Face transformers: an attention backend and a fused sampling processor.

Attention::

    from genfast.integrations.transformers import register
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=register())  # register() -> "genfast"

``register()`` adds ``"genfast"`` to transformers' ``AttentionInterface`` (the attention function) and to its
``AttentionMaskInterface`` (the mask builder). The second matters: transformers builds no mask at all for a name
it does not know, so a left-padded batch would silently attend to its padding. The mask builder is transformers'
own SDPA one (boolean, True = attend), so every mask pattern a model asks for (causal, sliding window, chunked,
packed sequences, padding, bidirectional) comes out exactly as for ``"sdpa"``; where the mask is only causal it
returns None and :func:`attention_forward` asks genfast's kernels for the causal (and sliding-window) pattern
instead of reading a mask.

Served: causal prefill, padding masks (bool or additive float), grouped-query attention (K/V are *not*
repeated: genfast reads head ``h // (Hq // Hk)``), sliding windows (Mistral/Qwen2/Gemma-style ``sliding_window``),
dropout while training, decoding with a KV cache (bottom-right aligned), cross-attention, and the module's
``scaling``. Not served, with an error naming the feature: logit soft-capping, attention sinks, a position bias
(T5-style), ``output_attentions``, value head dims that differ from the query's. Nothing falls back silently.

Sampling::

    proc = GenfastLogitsProcessor(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1)
    model.generate(**inputs, **proc.generate_kwargs(), max_new_tokens=32)

``generate_kwargs()`` is ``do_sample=True``, transformers' own warpers off (``temperature=1.0, top_k=0,
top_p=1.0, min_p=None, repetition_penalty=1.0``) and ``logits_processor=[proc]``, so that the model's generation
config cannot apply a filter twice.
"""

from __future__ import annotations

import math
import numbers

import torch
import transformers
from packaging import version
from transformers import LogitsProcessor

import genfast.ops

NAME = "genfast"
MIN_TRANSFORMERS = "4.53"  # AttentionMaskInterface (transformers.masking_utils) arrived in 4.53


class UnsupportedAttentionError(NotImplementedError):
    """A transformers attention call uses a feature genfast's attention does not have (nothing falls back)."""


def _unsupported(feature: str) -> UnsupportedAttentionError:
    return UnsupportedAttentionError(
        f"genfast attention (transformers): {feature} is not supported by genfast.ops.attention; load the model "
        "with attn_implementation='sdpa' or 'eager' for it")


def _weights_requested() -> bool:
    """Whether the running forward records attention weights (``output_attentions=True``).

    transformers 5 passes ``output_attentions`` to some attention functions (Llama's, BERT's) but not to all
    (GPT-2's pops it): it records whatever each attention module returns through forward hooks, into the collector
    of the running forward. A fused call returns no weights, so without this check GPT-2 answered
    ``attentions=()`` without a word."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # before the output collector: the flag reaches the function in kwargs
        return False
    try:
        collected = _active_collector.get()
    except LookupError:
        return False
    return bool(collected) and ("attentions" in collected or "cross_attentions" in collected)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, sliding_window: int | None = None, softcap: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query [B, Hq, Nq, D], key/value [B, Hk, Nk, D] -> ([B, Nq, Hq, D],
    None). ``attention_mask`` is what the "genfast" mask builder made (bool [B, 1, Nq, Nk], or None when the pattern
    is plain causal), or a 4-D mask the caller passed (bool, or additive float)."""
    if softcap is not None:
        raise _unsupported(f"logit soft-capping (softcap={softcap})")
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise _unsupported(f"attention sinks ({name})")
    if kwargs.get("position_bias") is not None:
        raise _unsupported("a position bias (position_bias)")
    if kwargs.get("output_attentions") or _weights_requested():
        raise _unsupported("output_attentions=True (the fused kernel never forms the attention matrix)")
    if value.shape[-1] != query.shape[-1]:
        raise _unsupported(f"a value head dim ({value.shape[-1]}) that differs from the query's ({query.shape[-1]})")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() != 4:
        raise ValueError(f"genfast attention (transformers): attention_mask must be 4-D [B, 1 or H, Nq, Nk] here, got "
                         f"shape {tuple(attention_mask.shape)}; was the model loaded with attn_implementation="
                         f"'{NAME}' after register()?")
    elif attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise _unsupported(f"a {type(attention_mask).__name__} attention mask (flex attention's)")

    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = None
    if attention_mask is not None:
        # The mask carries every pattern (causal, window, padding); a longer one (static caches) is cut to the keys.
        attention_mask = attention_mask[..., :kv_len]
        causal = False
    else:
        # No mask means transformers found the pattern plain causal (or full); decoding one token sees every key.
        causal = bool(causal) and q_len > 1
        if causal and kv_len > q_len:
            # Only a prefill into an empty static cache gets here: the keys past the queries are empty slots (this
            # is what transformers' sdpa path does too, its is_causal being top-left aligned).
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        if sliding_window is not None:
            # transformers keeps key j for query i iff i - j < sliding_window (and j <= i when causal).
            left = int(sliding_window) - 1
            window = (left, None if (causal or q_len == 1) else left)
    out = genfast.ops.attention(query, key, value, causal=causal, attn_mask=attention_mask, dropout_p=float(dropout),
                                scale=scaling, window=window)
    return out.transpose(1, 2).contiguous(), None


def mask_forward(*args, **kwargs):
    """The "genfast" mask builder: transformers' SDPA one (bool, True = attend; None when plain causal)."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register "genfast" with transformers' attention and mask interfaces; returns the name (idempotent)."""
    if version.parse(transformers.__version__) < version.parse(MIN_TRANSFORMERS):
        raise ImportError(f"genfast.integrations.transformers needs transformers >= {MIN_TRANSFORMERS} "
                          f"(AttentionMaskInterface), found {transformers.__version__}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_forward)
    return NAME


# ------------------------------------------------------------------------------------------ sampling
def _number(name: str, value, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"GenfastLogitsProcessor: {name} must be a finite real number, got {value!r}")
    value = float(value)
    if value < lo or (lo_open and value == lo) or value > hi or (hi_open and value == hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"GenfastLogitsProcessor: {name} must be in {interval}, got {value}")
    return value


class GenfastLogitsProcessor(LogitsProcessor):
    """transformers' repetition penalty, temperature, top-k, top-p and min-p warpers as one genfast call.

    ``__call__(input_ids [B, L], scores [B, V]) -> filter_logits(scores, temperature=..., top_k=..., top_p=...,
    min_p=..., repetition_penalty=..., prev_tokens=input_ids)``: removed tokens at -inf, kept ones at
    ``penalised / temperature``, float32; the same kept set and values as transformers' processors applied in
    generate's order (repetition penalty over every id in ``input_ids``, prompt included; ties with the k-th
    value kept; at least one token kept). Use with sampling and transformers' own warpers off, e.g.
    ``model.generate(**inputs, **proc.generate_kwargs())``. Disabled values: top_k 0, top_p 1, min_p 0,
    repetition_penalty 1.
    """

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0):
        self.temperature = _number("temperature", temperature, 0.0, math.inf, lo_open=True, hi_open=True)
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
            raise ValueError(f"GenfastLogitsProcessor: top_k must be an int >= 0 (0 disables), got {top_k!r}")
        self.top_k = int(top_k)
        self.top_p = _number("top_p", top_p, 0.0, 1.0, lo_open=True)
        self.min_p = _number("min_p", min_p, 0.0, 1.0)
        self.repetition_penalty = _number("repetition_penalty", repetition_penalty, 0.0, math.inf, lo_open=True,
                                          hi_open=True)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        penalised = self.repetition_penalty != 1.0
        return genfast.ops.filter_logits(scores, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                         min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                                         prev_tokens=input_ids if penalised else None)

    def generate_kwargs(self) -> dict:
        """Keyword arguments for ``model.generate``: sampling on, transformers' own warpers off, this processor."""
        return {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None,
                "repetition_penalty": 1.0, "logits_processor": transformers.LogitsProcessorList([self])}

    def __repr__(self) -> str:
        return (f"GenfastLogitsProcessor(temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}, "
                f"min_p={self.min_p}, repetition_penalty={self.repetition_penalty})")


__all__ = ["register", "attention_forward", "mask_forward", "GenfastLogitsProcessor", "UnsupportedAttentionError",
           "NAME"]
