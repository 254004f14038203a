"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017), on genfast's attention.

    config = TransformerConfig.preset("small", src_vocab_size=40, tgt_vocab_size=45)
    model = Transformer(config)
    logits = model(src, tgt_in, src_pad_mask)             # (B, T, V_tgt)
    tokens = model.greedy_decode(src, max_len=50)         # (B, L)
    tokens, scores = model.beam_search(src, beam_size=4)  # (B, L), (B,)

As in the paper: sinusoidal positions added to embeddings scaled by sqrt(d_model), ReLU feed-forward blocks,
encoder self-attention (source padding masked), decoder causal self-attention and cross-attention to the encoder
output, dropout on sublayer outputs and attention probabilities. Two choices differ by default and are config
switches: **pre-LayerNorm** (``pre_norm=True``: LayerNorm before each sublayer and once after each stack, which
trains stably without a long warmup; ``pre_norm=False`` is the paper's post-LN), and the output projection tied to
the target embedding (``tie_output``, as the paper does). ``share_embeddings`` makes the source and target share one
table (one joint vocabulary).

Every attention is genfast.ops.attention (the fused kernels, or the reference, per genfast's backend choice); the
decoder's self-attention keeps a genfast.nn.KVCache during decoding, and the encoder output is projected to the
cross-attention keys and values once per decode.

Token conventions: ``pad_id`` pads sources and targets (``src_pad_mask`` is True at padding, as torch's
key_padding_mask), target sequences are ``[bos] + tokens + [eos]``; decoding never emits pad or bos.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genfast import ops
from genfast.models._config import ModelConfig, check_ints, check_number
from genfast.nn.attention import KVCache, attend_cached, capture_decode_step
from genfast.ops.attention import attention_ref

NAME = "Transformer"
# How often (in decoded tokens) decoding asks the device whether every sequence has finished.
EOS_CHECK_EVERY = 8


# ------------------------------------------------------------------------------------------- config
@dataclass
class TransformerConfig(ModelConfig):
    """from_dict (unknown keys and mistyped values a ValueError naming them), to_dict and preset (``tiny`` for
    tests, ``small`` the translator recipe's default, ``base`` the paper's base model) come from ModelConfig;
    PRESETS is attached below."""

    src_vocab_size: int = 64
    tgt_vocab_size: int = 64
    d_model: int = 128
    n_heads: int = 4
    n_encoder_layers: int = 3
    n_decoder_layers: int = 3
    d_ff: int = 512
    dropout: float = 0.1
    max_positions: int = 256  # the longest source, and the longest target including bos
    pre_norm: bool = True  # False: the paper's post-LN
    share_embeddings: bool = False  # one table for source and target (needs src_vocab_size == tgt_vocab_size)
    tie_output: bool = True  # logits = h @ target_embedding.T
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self):
        check_ints(self, ("src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "n_encoder_layers",
                          "n_decoder_layers", "d_ff", "max_positions"))
        if self.d_model % self.n_heads:
            raise ValueError(f"{NAME}Config: d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        if self.d_model % 2:
            raise ValueError(f"{NAME}Config: d_model must be even (sinusoidal positions pair sin and cos), "
                             f"got {self.d_model}")
        check_number(self, "dropout", minimum=0.0, below=1.0)
        for name in ("pre_norm", "share_embeddings", "tie_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{NAME}Config: {name} must be a bool, got {getattr(self, name)!r}")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ValueError(f"{NAME}Config: share_embeddings needs one vocabulary, got src_vocab_size="
                             f"{self.src_vocab_size} and tgt_vocab_size={self.tgt_vocab_size}")
        for name in ("pad_id", "bos_id", "eos_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.tgt_vocab_size:
                raise ValueError(f"{NAME}Config: {name} must be a token id in [0, tgt_vocab_size="
                                 f"{self.tgt_vocab_size}), got {value!r}")
        if self.pad_id >= self.src_vocab_size:
            raise ValueError(f"{NAME}Config: pad_id={self.pad_id} must also be a source token id "
                             f"(< src_vocab_size={self.src_vocab_size})")
        if len({self.pad_id, self.bos_id, self.eos_id}) != 3:
            raise ValueError(f"{NAME}Config: pad_id, bos_id and eos_id must differ, got "
                             f"{self.pad_id}, {self.bos_id}, {self.eos_id}")


PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=32, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=64, dropout=0.0,
                 max_positions=64),
    "small": dict(d_model=128, n_heads=4, n_encoder_layers=3, n_decoder_layers=3, d_ff=512, dropout=0.1,
                  max_positions=256),
    "base": dict(d_model=512, n_heads=8, n_encoder_layers=6, n_decoder_layers=6, d_ff=2048, dropout=0.1,
                 max_positions=512),
}
TransformerConfig.PRESETS = PRESETS


def sinusoidal_positions(n: int, d: int) -> torch.Tensor:
    """(n, d): PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d))."""
    position = torch.arange(n, dtype=torch.float64)[:, None]
    frequency = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(position * frequency)
    pe[:, 1::2] = torch.cos(position * frequency)
    return pe.float()


# ------------------------------------------------------------------------------------------- blocks
def _attention(q, k, v, *, causal: bool = False, keep: torch.Tensor | None = None, dropout_p: float = 0.0):
    """genfast.ops.attention; fp64 (which the kernels do not serve, and which tests use for ground truths) takes
    its specification, attention_ref, with the kernels' dropout stream."""
    if q.dtype != torch.float64:
        return ops.attention(q, k, v, causal=causal, attn_mask=keep, dropout_p=dropout_p)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device) if dropout_p else None
    return attention_ref(q, k, v, causal=causal, attn_mask=keep, dropout_p=dropout_p, seed=seed)


def _attend_cached(q: torch.Tensor, cache: KVCache, dropout_p: float) -> torch.Tensor:
    """The new queries q (B, nh, T, hs) over the cache, which already holds them: genfast.nn's seam for a decode
    kernel, or in fp64 the same masking spelled out."""
    if q.dtype != torch.float64:
        return attend_cached(q, cache, dropout_p)
    t, n = q.shape[2], cache.bound
    last = cache.lengths[:, None] - t + torch.arange(t, device=q.device)  # (B, T): each query's own position
    keep = (torch.arange(n, device=q.device)[None, None, :] <= last[:, :, None])[:, None]  # (B, 1, T, n)
    return _attention(q, cache.k[:, :, :n].to(q.dtype), cache.v[:, :, :n].to(q.dtype), keep=keep,
                      dropout_p=dropout_p)


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(B, T, C) -> (B, nh, T, hs)."""
    b, t, c = x.shape
    return x.view(b, t, n_heads, c // n_heads).transpose(1, 2)


def _merge(y: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, hs) -> (B, T, C)."""
    b, h, t, d = y.shape
    return y.transpose(1, 2).reshape(b, t, h * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention, q/k/v from one GEMM; causal (decoder) or with a key mask (encoder)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None, causal: bool = False,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, C); keep: bool (B, 1, 1, T), True = attend. With ``cache``, x holds only the new tokens and
        attends to everything cached before them (and itself)."""
        q, k, v = (_heads(z, self.n_heads) for z in self.qkv(x).chunk(3, dim=-1))  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        if cache is None:
            y = _attention(q, k, v, causal=causal, keep=keep, dropout_p=p)
        else:
            cache.append(k, v)
            y = _attend_cached(q, cache, p)
        return self.out(_merge(y))


class CrossAttention(nn.Module):
    """Multi-head attention of the decoder over the encoder output (``memory``)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of the encoder output, (B, nh, S, hs) each: computed once per decode."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return _heads(k, self.n_heads), _heads(v, self.n_heads)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], keep: torch.Tensor | None):
        q = _heads(self.q(x), self.n_heads)
        k, v = kv
        y = _attention(q, k.to(q.dtype), v.to(q.dtype), keep=keep, dropout_p=self.dropout if self.training else 0.0)
        return self.out(_merge(y))


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.drop(self.attn(self.norm1(x), keep=keep))
            return x + self.drop(self.ff(self.norm2(x)))
        x = self.norm1(x + self.drop(self.attn(x, keep=keep)))
        return self.norm2(x + self.drop(self.ff(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.pre_norm = cfg.pre_norm
        self.self_attn = SelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.cross_attn = CrossAttention(cfg.d_model, cfg.n_heads, cfg.dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, memory_kv, keep, cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, C) targets; memory_kv: this layer's cross-attention (k, v); keep (B, 1, 1, S) or None."""
        # With a cache, x holds new tokens only; causality then comes from the cache's positions.
        causal = cache is None
        if self.pre_norm:
            x = x + self.drop(self.self_attn(self.norm1(x), causal=causal, cache=cache))
            x = x + self.drop(self.cross_attn(self.norm2(x), memory_kv, keep))
            return x + self.drop(self.ff(self.norm3(x)))
        x = self.norm1(x + self.drop(self.self_attn(x, causal=causal, cache=cache)))
        x = self.norm2(x + self.drop(self.cross_attn(x, memory_kv, keep)))
        return self.norm3(x + self.drop(self.ff(x)))


# ------------------------------------------------------------------------------------------- model
class Transformer(nn.Module):
    """Encoder-decoder Transformer for sequence-to-sequence tasks (see the module docstring)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"{NAME}: config must be a TransformerConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.src_embed = nn.Embedding(cfg.src_vocab_size, cfg.d_model)
        self.tgt_embed = self.src_embed if cfg.share_embeddings else nn.Embedding(cfg.tgt_vocab_size, cfg.d_model)
        self.register_buffer("positions", sinusoidal_positions(cfg.max_positions, cfg.d_model), persistent=False)
        self.embed_drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_decoder_layers))
        # Pre-LN leaves each stack's residual stream unnormalised: one LayerNorm closes it.
        self.encoder_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        self.decoder_norm = nn.LayerNorm(cfg.d_model) if cfg.pre_norm else nn.Identity()
        self.lm_head = None if cfg.tie_output else nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                # std d^-1/2: after the sqrt(d) scaling the embeddings have unit scale, like the positions.
                nn.init.normal_(module.weight, std=self.config.d_model ** -0.5)

    # ---------------------------------------------------------------- checks
    def _check_tokens(self, name: str, tokens, vocab_size: int | None = None) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() != 2:
            got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"{NAME}: {name} must be an int64 tensor (B, T) of token ids, got {got}")
        if tokens.shape[0] == 0 or tokens.shape[1] == 0:
            raise ValueError(f"{NAME}: {name} is empty, shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.max_positions:
            raise ValueError(f"{NAME}: {name} has {tokens.shape[1]} tokens, more than max_positions="
                             f"{self.config.max_positions}")
        if tokens.device != self.positions.device:
            raise ValueError(f"{NAME}: {name} is on {tokens.device} but the model is on {self.positions.device}")

    def _keep(self, src: torch.Tensor, src_pad_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Validate src_pad_mask (B, S), True at padding; return the attention keep mask (B, 1, 1, S)."""
        if src_pad_mask is None:
            return None
        if not isinstance(src_pad_mask, torch.Tensor) or src_pad_mask.dtype != torch.bool:
            raise ValueError(f"{NAME}: src_pad_mask must be a bool tensor (B, S), True at padding")
        if src_pad_mask.shape != src.shape:
            raise ValueError(f"{NAME}: src_pad_mask has shape {tuple(src_pad_mask.shape)} but src has "
                             f"{tuple(src.shape)}")
        if src_pad_mask.device != src.device:
            raise ValueError(f"{NAME}: src_pad_mask is on {src_pad_mask.device} but src is on {src.device}")
        return ~src_pad_mask[:, None, None, :]

    def _embed(self, table: nn.Embedding, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = table(tokens) * math.sqrt(self.config.d_model) + self.positions[offset:offset + tokens.shape[1]]
        return self.embed_drop(x)

    # ---------------------------------------------------------------- training
    def encode(self, src: torch.Tensor, src_pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S) -> memory (B, S, C). Positions at padding hold values no one attends to."""
        self._check_tokens("src", src)
        keep = self._keep(src, src_pad_mask)
        x = self._embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, keep)
        return self.encoder_norm(x)

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor,
               src_pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tgt_in (B, T) (starting with bos), memory (B, S, C) -> logits (B, T, V_tgt)."""
        self._check_tokens("tgt_in", tgt_in)
        keep = None if src_pad_mask is None else ~src_pad_mask[:, None, None, :]
        x = self._embed(self.tgt_embed, tgt_in)
        for layer in self.decoder:
            x = layer(x, layer.cross_attn.memory_kv(memory), keep)
        return self._logits(self.decoder_norm(x))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.tgt_embed.weight)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor,
                src_pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, S), tgt_in (B, T) (bos + target without its last token), src_pad_mask (B, S) bool, True at
        padding (None: no padding) -> logits (B, T, V_tgt)."""
        self._check_tokens("src", src)
        self._check_tokens("tgt_in", tgt_in)
        if tgt_in.shape[0] != src.shape[0]:
            raise ValueError(f"{NAME}: src has batch {src.shape[0]} but tgt_in has batch {tgt_in.shape[0]}")
        return self.decode(tgt_in, self.encode(src, src_pad_mask), src_pad_mask)

    def loss(self, src: torch.Tensor, tgt_in: torch.Tensor, tgt_out: torch.Tensor,
             src_pad_mask: torch.Tensor | None = None, *, label_smoothing: float = 0.0,
             reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of tgt_out (B, T) (targets shifted left, pad_id where there is none): the mean over
        target tokens, or with ``reduction="sum"`` the sum (for averaging over a batch split across processes)."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"{NAME}.loss: reduction must be 'mean' or 'sum', got {reduction!r}")
        if not isinstance(tgt_out, torch.Tensor) or tgt_out.shape != tgt_in.shape:
            raise ValueError(f"{NAME}.loss: tgt_out must have tgt_in's shape {tuple(tgt_in.shape)}")
        logits = self(src, tgt_in, src_pad_mask)
        return F.cross_entropy(logits.float().flatten(0, 1), tgt_out.flatten(), ignore_index=self.config.pad_id,
                               label_smoothing=label_smoothing, reduction=reduction)

    # ---------------------------------------------------------------- decoding
    def _start_decode(self, src, src_pad_mask, max_len, bos, eos):
        cfg = self.config
        self._check_tokens("src", src)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"{NAME}: max_len must be an int >= 1, got {max_len!r}")
        if max_len > cfg.max_positions:
            raise ValueError(f"{NAME}: max_len={max_len} exceeds max_positions={cfg.max_positions}")
        bos = cfg.bos_id if bos is None else bos
        eos = cfg.eos_id if eos is None else eos
        for name, value in (("bos", bos), ("eos", eos)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < cfg.tgt_vocab_size:
                raise ValueError(f"{NAME}: {name} must be a target token id in [0, {cfg.tgt_vocab_size}), "
                                 f"got {value!r}")
        keep = self._keep(src, src_pad_mask)
        memory = self.encode(src, src_pad_mask)
        memory_kv = [layer.cross_attn.memory_kv(memory) for layer in self.decoder]
        return memory, memory_kv, keep, bos, eos

    def _new_caches(self, batch: int, max_len: int, like: torch.Tensor) -> list[KVCache]:
        cfg = self.config
        return [KVCache(batch, cfg.n_heads, max_len, cfg.d_model // cfg.n_heads, dtype=like.dtype,
                        device=like.device) for _ in self.decoder]

    def _banned(self, bos: int, device) -> torch.Tensor:
        """Bool (V,): the tokens decoding never emits (pad and bos)."""
        banned = torch.zeros(self.config.tgt_vocab_size, dtype=torch.bool, device=device)
        banned[[self.config.pad_id, bos]] = True
        return banned

    def _next_log_probs(self, tokens, memory, src_pad_mask, banned) -> torch.Tensor:
        """Log-probabilities (N, V) of the token after ``tokens`` (N, t), re-running the decoder over the whole
        prefix: the reference the cached step is tested against (``use_cache=False``)."""
        logits = self.decode(tokens, memory, src_pad_mask)[:, -1].float().masked_fill(banned, -math.inf)
        return torch.log_softmax(logits, dim=-1)

    def _decode_step(self, memory_kv, keep, caches: list[KVCache], banned: torch.Tensor):
        """The cached decode step: (token (N,), position (N,) int64) -> log-probabilities (N, V) of the next token.

        Fixed shapes, caches and lengths updated in place, no host synchronisation: the same step runs eagerly
        and, on a GPU, as a captured CUDA graph."""
        scale = math.sqrt(self.config.d_model)

        def step(token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
            x = self.embed_drop(self.tgt_embed(token[:, None]) * scale + self.positions[position][:, None])
            for layer, kv, cache in zip(self.decoder, memory_kv, caches):
                x = layer(x, kv, keep, cache=cache)
            logits = self._logits(self.decoder_norm(x))[:, -1].float().masked_fill(banned, -math.inf)
            return torch.log_softmax(logits, dim=-1)

        return step

    def _stepper(self, memory, memory_kv, keep, src_pad_mask, n: int, max_len: int, bos: int, use_cache: bool,
                 cuda_graph: bool | None):
        """(next(token, position, history) -> log-probs (N, V), caches or None) for N rows; ``history`` (N, i)
        holds the tokens so far (bos excluded), which only the uncached reference path reads."""
        device = memory.device
        banned = self._banned(bos, device)
        if not use_cache:
            if cuda_graph:
                raise ValueError(f"{NAME}: cuda_graph=True needs use_cache=True (the cached step is what is captured)")
            bos_col = torch.full((n, 1), bos, dtype=torch.long, device=device)
            return (lambda token, position, history: self._next_log_probs(
                torch.cat([bos_col, history], dim=1), memory, src_pad_mask, banned)), None
        caches = self._new_caches(n, max_len, memory)
        step = self._decode_step(memory_kv, keep, caches, banned)
        if self._graph_choice(cuda_graph, device):
            inputs = (torch.zeros(n, dtype=torch.long, device=device), torch.zeros(n, dtype=torch.long, device=device))
            step = capture_decode_step(step, inputs, caches)
        return (lambda token, position, history: step(token, position)), caches

    def _graph_choice(self, cuda_graph, device) -> bool:
        if cuda_graph is None:  # on where it is safe: CUDA, eval mode
            return device.type == "cuda" and not self.training
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"{NAME}: cuda_graph must be None or a bool, got {type(cuda_graph).__name__}")
        if cuda_graph and (device.type != "cuda" or self.training):
            raise ValueError(f"{NAME}: cuda_graph=True needs a model on a CUDA device in eval mode (on {device}, "
                             f"training={self.training})")
        return cuda_graph

    @torch.no_grad()
    def greedy_decode(self, src: torch.Tensor, max_len: int = 64, bos: int | None = None, eos: int | None = None,
                      src_pad_mask: torch.Tensor | None = None, *, use_cache: bool = True,
                      cuda_graph: bool | None = None) -> torch.Tensor:
        """The most likely next token at each step: tokens (B, L <= max_len), ending with eos (then pad_id) or cut
        at max_len; bos not included. ``use_cache=False`` re-runs the decoder over the whole prefix each step.
        ``cuda_graph`` (default: on for a CUDA model in eval mode) replays the cached step as a CUDA graph. The
        device is asked whether every sequence has finished only every few tokens; the output is trimmed to the
        step where the last one did."""
        memory, memory_kv, keep, bos, eos = self._start_decode(src, src_pad_mask, max_len, bos, eos)
        b, device, pad = src.shape[0], src.device, self.config.pad_id
        next_log_probs, _ = self._stepper(memory, memory_kv, keep, src_pad_mask, b, max_len, bos, use_cache,
                                          cuda_graph)
        out = torch.full((b, max_len), pad, dtype=torch.long, device=device)
        token = torch.full((b,), bos, dtype=torch.long, device=device)
        position = torch.zeros(b, dtype=torch.long, device=device)
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        open_steps = torch.zeros((), dtype=torch.long, device=device)  # steps after which some row was unfinished
        steps = 0
        for i in range(max_len):
            token = next_log_probs(token, position, out[:, :i]).argmax(dim=-1).masked_fill_(finished, pad)
            out[:, i] = token
            finished |= token == eos
            open_steps += ~finished.all()
            position += 1
            steps = i + 1
            if steps % EOS_CHECK_EVERY == 0 and bool(finished.all()):
                break
        return out[:, :min(int(open_steps) + 1, steps)]

    @torch.no_grad()
    def beam_search(self, src: torch.Tensor, beam_size: int = 4, max_len: int = 64, length_penalty: float = 1.0,
                    bos: int | None = None, eos: int | None = None, src_pad_mask: torch.Tensor | None = None, *,
                    use_cache: bool = True, cuda_graph: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Beam search, batched: (tokens (B, L), log_probs (B,)).

        Keeps the ``beam_size`` best hypotheses per source. A hypothesis that emitted eos stays in the beam with
        its score frozen (it extends only by pad, at no cost), so finished and open hypotheses compete for the
        beam. Hypotheses are ranked by ``log P / lp(length)`` with GNMT's ``lp(L) = ((5 + L) / 6) ** length_penalty``
        (0: plain log-probability; larger values favour longer outputs). Returns the best hypothesis per source
        (its tokens as ``greedy_decode`` returns them) and its log-probability (sum over its tokens, eos included,
        not length-normalised). With beam_size=1 this is greedy decoding. ``cuda_graph`` as in greedy_decode (the
        beams' caches are reordered in place, outside the graph).
        """
        if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
            raise ValueError(f"{NAME}.beam_search: beam_size must be an int >= 1, got {beam_size!r}")
        if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) \
                or not math.isfinite(length_penalty):
            raise ValueError(f"{NAME}.beam_search: length_penalty must be a finite number, got {length_penalty!r}")
        memory, memory_kv, keep, bos, eos = self._start_decode(src, src_pad_mask, max_len, bos, eos)
        b, k, device, pad = src.shape[0], beam_size, src.device, self.config.pad_id
        n = b * k
        # Every source's beams, side by side: row b * k + j is beam j of source b.
        memory = memory.repeat_interleave(k, dim=0)
        memory_kv = [(mk.repeat_interleave(k, dim=0), mv.repeat_interleave(k, dim=0)) for mk, mv in memory_kv]
        keep = None if keep is None else keep.repeat_interleave(k, dim=0)
        pad_mask = None if src_pad_mask is None else src_pad_mask.repeat_interleave(k, dim=0)
        next_log_probs, caches = self._stepper(memory, memory_kv, keep, pad_mask, n, max_len, bos, use_cache,
                                               cuda_graph)

        def lp(length: torch.Tensor) -> torch.Tensor:
            return ((5.0 + length.float()) / 6.0) ** length_penalty

        history = torch.full((n, max_len), pad, dtype=torch.long, device=device)
        token = torch.full((n,), bos, dtype=torch.long, device=device)
        position = torch.zeros(n, dtype=torch.long, device=device)
        scores = torch.full((b, k), -math.inf, device=device)
        scores[:, 0] = 0.0  # one live hypothesis at the start: the others would only duplicate it
        lengths = torch.zeros(b, k, dtype=torch.long, device=device)
        finished = torch.zeros(b, k, dtype=torch.bool, device=device)
        # A finished hypothesis extends only by pad, at no cost: one candidate, its score unchanged.
        frozen = torch.full((self.config.tgt_vocab_size,), -math.inf, device=device)
        frozen[pad] = 0.0
        beam_rows = torch.arange(b, device=device)[:, None] * k
        open_steps = torch.zeros((), dtype=torch.long, device=device)
        steps = 0
        for t in range(max_len):
            log_probs = next_log_probs(token, position, history[:, :t])  # (N, V)
            v = log_probs.shape[-1]
            log_probs = torch.where(finished[..., None], frozen, log_probs.view(b, k, v))
            candidates = scores[..., None] + log_probs  # (B, K, V)
            cand_len = torch.where(finished, lengths, t + 1)  # (B, K)
            ranked = (candidates / lp(cand_len)[..., None]).view(b, k * v)
            top = ranked.topk(k, dim=-1).indices  # (B, K)
            beam, token = top // v, (top % v).view(n)
            scores = candidates.view(b, k * v).gather(1, top)
            lengths = cand_len.gather(1, beam)
            finished = finished.gather(1, beam) | (token.view(b, k) == eos)
            rows = (beam_rows + beam).view(n)
            # Reorder in place (fixed addresses for a captured step), only the t slots written so far; every beam
            # has the same length, so the caches' lengths need no reordering.
            history[:, :t] = history[rows, :t]
            history[:, t] = token
            for cache in caches or ():
                cache.k[:, :, :t + 1] = cache.k[rows, :, :t + 1]
                cache.v[:, :, :t + 1] = cache.v[rows, :, :t + 1]
            position += 1
            open_steps += ~finished.all()
            steps = t + 1
            if steps % EOS_CHECK_EVERY == 0 and bool(finished.all()):
                break
        best = (scores / lp(lengths)).argmax(dim=-1)  # (B,)
        rows = torch.arange(b, device=device) * k + best
        return history[rows, :min(int(open_steps) + 1, steps)], scores.gather(1, best[:, None]).squeeze(1)

    @torch.no_grad()
    def sequence_log_prob(self, src: torch.Tensor, tokens: torch.Tensor, src_pad_mask: torch.Tensor | None = None,
                          bos: int | None = None, eos: int | None = None) -> torch.Tensor:
        """log P(tokens | src) (B,) under the decoding distribution (pad and bos excluded), summed up to and
        including the first eos; ``tokens`` (B, L) as greedy_decode and beam_search return them."""
        _, _, _, bos, eos = self._start_decode(src, src_pad_mask, max(1, tokens.shape[1]), bos, eos)
        tgt_in = torch.cat([torch.full_like(tokens[:, :1], bos), tokens[:, :-1]], dim=1)
        logits = self(src, tgt_in, src_pad_mask).float()
        logits[..., [self.config.pad_id, bos]] = -math.inf
        picked = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)  # (B, L)
        ended_before = torch.cumsum((tokens == eos).long(), dim=1) - (tokens == eos).long() > 0
        return picked.masked_fill(ended_before, 0.0).sum(dim=1)


__all__ = ["Transformer", "TransformerConfig", "PRESETS", "sinusoidal_positions"]
