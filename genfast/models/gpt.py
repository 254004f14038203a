"""GPT: the GPT-2 architecture on genfast's attention, KV-cache decode and sampling ops.

Learned token and position embeddings, pre-LayerNorm blocks (causal self-attention, then a GELU(tanh) MLP, each
added to the residual stream), a final LayerNorm and an output projection tied to the token embedding. Module
names follow Hugging Face's GPT2LMHeadModel (``transformer.h.0.attn.c_attn`` ...), so ``from_pretrained`` loads a
local GPT-2 checkpoint by transposing its Conv1D weights, and ``save_pretrained`` writes one transformers loads.

    model = GPT(GPTConfig.preset("tiny", vocab_size=tokenizer.vocab_size))
    logits, loss = model(idx, targets)                       # idx, targets int64 [B, T]
    out = model.generate(prompt, 100, temperature=0.8, top_k=50)

Attention runs through genfast.nn.CausalSelfAttention (genfast.ops.attention; with a KV cache,
genfast.ops.attention_decode and kv_cache_append); sampling through genfast.ops.sample_tokens. The backend is
chosen per call by genfast's dispatcher (``with genfast.backend("reference"): ...`` runs the plain-PyTorch path).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from genfast import _io, ops
from genfast.models import gpt_hf
from genfast.models._checkpoint import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    check_run_config,
    check_weights,
    find_run_checkpoint,
)
from genfast.models._config import ModelConfig, check_int, check_ints
from genfast.models._decode_linear import DecodeLinear, decode_linears, release_packed
from genfast.nn.attention import CausalSelfAttention, KVCache, capture_decode_step
from genfast.ops.attention_decode import PAGE_SIZES, batch_invariant_decode

# Presets: the sizes of OpenAI's GPT-2 models, and a tiny one that trains in minutes on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, vocab_size=50257),
}
# How often (in decoded tokens) generate() asks the device whether every sequence has met eos_token_id.
EOS_CHECK_EVERY = 8


@dataclass
class GPTConfig(ModelConfig):
    """from_dict (unknown keys and mistyped values a ValueError naming them), to_dict and preset (``tiny``,
    ``gpt2``, ``gpt2-medium``, with any field overridden) come from ModelConfig; PRESETS is attached below."""

    vocab_size: int = 50257
    block_size: int = 1024  # the context: the number of learned positions
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int | None = None  # the MLP's hidden width; None means 4 * n_embd
    dropout: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        check_ints(self, ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"))
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if self.n_inner is not None:
            check_int(self, "n_inner")
        if not isinstance(self.dropout, numbers.Real) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig: bias must be a bool, got {self.bias!r}")
        if not isinstance(self.layer_norm_epsilon, numbers.Real) or not self.layer_norm_epsilon > 0:
            raise ValueError(f"GPTConfig: layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")

    @property
    def mlp_width(self) -> int:
        return self.n_inner or 4 * self.n_embd


GPTConfig.PRESETS = PRESETS


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = DecodeLinear(config.n_embd, config.mlp_width, bias=config.bias)
        self.c_proj = DecodeLinear(config.mlp_width, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2's "gelu_new" is the tanh approximation.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.dropout, config.bias,
                                        max_seq_len=config.block_size)
        # The attention's own parameters, in DecodeLinears: a CPU decode step multiplies by copies laid out for it.
        self.attn.c_attn = DecodeLinear.from_linear(self.attn.c_attn)
        self.attn.c_proj = DecodeLinear.from_linear(self.attn.c_proj)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache=kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2. forward(idx [B, T] int64, targets [B, T] int64 or None) -> (logits [B, T, V], loss or None).

    targets equal to -1 are ignored by the loss (cross-entropy averaged over the others).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT: config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias),
        ))
        self.lm_head = DecodeLinear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream (one per sublayer: 2 per block).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self, non_embedding: bool = True) -> int:
        """Parameters counted once (the tied head is the token embedding); without the positions by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def release_decode_copies(self) -> int:
        """Free the copies of the linear weights that CPU decode steps keep (one extra copy of the linear weights,
        0.49 GB for GPT-2 124M in fp32; models/_decode_linear.py); returns how many. Also what to call after
        writing weights through ``.data``, which no version counter sees. The next decode step makes them again."""
        return release_packed(self)

    # ------------------------------------------------------------------------------------------ forward
    def _check_idx(self, idx, name: str = "idx") -> None:
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"GPT: {name} must be a torch.Tensor, got {type(idx).__name__}")
        if idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"GPT: {name} must be int64 [B, T] with T >= 1, got {idx.dtype} {tuple(idx.shape)}")

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                      kv_caches: list[KVCache] | None = None) -> torch.Tensor:
        """The final hidden states [B, T, C] (after ln_f) of tokens idx [B, T] at ``positions`` ([T] or [B, T],
        default 0..T-1); with ``kv_caches`` (one per block) the tokens follow the ones cached."""
        b, t = idx.shape
        if positions is None:
            positions = torch.arange(t, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if kv_caches is None else kv_caches[i])
        return self.transformer.ln_f(x)

    def _check_token_ids(self, idx: torch.Tensor, name: str) -> None:
        """Token ids in [0, vocab_size): one host sync (skipped under torch.compile), instead of an IndexError or
        a device-side assert from the embedding."""
        if torch.compiler.is_compiling() or idx.numel() == 0:
            return
        lo, hi = (int(x) for x in torch.aminmax(idx))
        vocab = self.config.vocab_size
        if lo < 0 or hi >= vocab:
            raise ValueError(f"GPT: {name} must hold token ids in [0, vocab_size={vocab}), got values in [{lo}, {hi}]")

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        self._check_idx(idx)
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"GPT: a sequence of {t} tokens is longer than the context "
                             f"(block_size={self.config.block_size})")
        self._check_token_ids(idx, "idx")
        logits = self.lm_head(self.hidden_states(idx))  # (B, T, V)
        loss = None
        if targets is not None:
            self._check_idx(targets, "targets")
            if targets.shape != idx.shape:
                raise ValueError(f"GPT: targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}")
            # fp32 loss: under bf16 autocast the logits are bf16, too coarse for a log-softmax over the vocabulary.
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    # ------------------------------------------------------------------------------------------ generation
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature=1.0, top_k=0, top_p=1.0,
                 min_p=0.0, repetition_penalty=1.0, eos_token_id: int | None = None,
                 attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 seed: int | torch.Tensor | None = None, stream: bool = False, cuda_graph: bool | None = None,
                 kv_block_size: int | None = None):
        """Continue the prompts ``input_ids`` [B, T] int64 by up to ``max_new_tokens`` tokens.

        Returns [B, T + n] (the prompts, then the n <= max_new_tokens new tokens); with ``stream=True`` an
        iterator that yields each step's new tokens [B] (int64, on the model's device) as they are drawn.
        Sampling knobs are those of genfast.ops.sample_tokens (temperature 0: greedy); the repetition penalty
        sees each prompt (without its padding) and the tokens generated so far. ``attention_mask`` [B, T]
        (1 = token, 0 = padding) allows prompts of different lengths, padded on the left: every sequence is
        then continued exactly as if it were alone. With ``eos_token_id`` a sequence that emits it is
        finished (later tokens are eos_token_id) and generation stops once every sequence has finished.

        The prompt is run once (prefill), filling a preallocated KV cache per block; each new token then costs
        one decode step of fixed shapes (attention_decode over the whole cache, the per-row lengths read on the
        device) and sample_tokens over its logits, without waiting for the host: the only synchronisations are
        the check of the first step's real logits (a temperature so small that logits / temperature overflows
        is a ValueError, as are NaN logits) and whether all sequences met eos_token_id, every few tokens (every
        token when streaming, whose consumer waits for each token anyway). ``cuda_graph`` (default: on for a
        CUDA model when not streaming) replays the decode step as one captured CUDA graph; it needs CUDA.
        Dropout applies if the model is in training mode: call ``model.eval()`` first.

        ``seed`` (for serving; excludes ``generator``): per-row sampling streams, an int (row b gets seed + b) or an
        int64 [B] tensor. Row b's i-th new token is drawn with ``sample_tokens(seeds=, offsets=)`` at seed_b and
        offset i (0 at each row's first new token), and decode runs ``attention_decode(batch_invariant=True)``
        over caches of the context's size (block_size slots, so the split count does not depend on the longest
        prompt). So a prompt with the same seed draws from the same noise and decodes through the same attention
        arithmetic alone or in any batch. The prefill is not bitwise batch-invariant (a prompt padded in a batch
        runs longer rows: its hidden states differed in the last bit, 2e-7, on a CPU in fp32), which can change a
        token only at a near-tie of the sampling thresholds; tests/test_models_gpt.py sees identical tokens.

        ``kv_block_size`` (16 to 256, a power of two; default None: dense caches) pages the KV caches
        (genfast.nn.KVCache(block_size=)): each prompt gets blocks for its own tokens and ``max_new_tokens`` only
        (for the padded prefill at least the longest prompt's), not the batch's longest span or the context. The
        decode kernels read the same logical slots with the same arithmetic, so the tokens are those of the dense
        caches (tests/test_paged_kv_cache.py, tests/test_models_gpt.py).
        """
        if not isinstance(stream, bool):
            raise TypeError(f"GPT.generate: stream must be a bool, got {type(stream).__name__}")
        if kv_block_size is not None and (isinstance(kv_block_size, bool) or not isinstance(kv_block_size, int)):
            raise TypeError(f"GPT.generate: kv_block_size must be None or an int, got {type(kv_block_size).__name__}")
        if kv_block_size is not None and kv_block_size not in PAGE_SIZES:
            raise ValueError(f"GPT.generate: kv_block_size must be None or one of {PAGE_SIZES}, got {kv_block_size}")
        knobs = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                     repetition_penalty=repetition_penalty)
        # Checked here, not in the step generator, so that a streaming call fails at once rather than on next().
        self._check_generate(input_ids, max_new_tokens, eos_token_id, attention_mask, generator, knobs)
        seeds = self._check_seed(seed, generator, input_ids.shape[0])
        cuda_graph = self._graph_choice(cuda_graph, stream)
        steps = self._generate_steps(input_ids, max_new_tokens, knobs, eos_token_id, attention_mask, generator,
                                     stream, cuda_graph, seeds, kv_block_size)
        if stream:
            return steps
        new = list(steps)
        if not new:
            return input_ids.clone()
        generated = torch.stack(new, dim=1)  # (B, n)
        if eos_token_id is not None:
            # Sequences are only checked every few tokens: drop the steps after the one where all had finished.
            all_done = (generated == eos_token_id).all(dim=0)
            if bool(all_done.any()):
                generated = generated[:, :int(all_done.int().argmax()) + 1]
        return torch.cat([input_ids, generated], dim=1)

    def _check_seed(self, seed, generator, batch: int) -> torch.Tensor | None:
        """``seed`` as the int64 [B] per-row seeds on the model's device (None without a seed)."""
        op = "GPT.generate"
        if seed is None:
            return None
        if generator is not None:
            raise ValueError(f"{op}: pass seed or generator, not both (seed gives each row its own stream)")
        device = self.transformer.wte.weight.device
        if isinstance(seed, torch.Tensor):
            if seed.dtype != torch.int64 or seed.shape != (batch,):
                raise ValueError(f"{op}: seed as a tensor must be int64 [B] = [{batch}], got {seed.dtype} "
                                 f"{tuple(seed.shape)}")
            return seed.to(device)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"{op}: seed must be None, an int or an int64 [B] tensor, got {type(seed).__name__}")
        lo, hi = -(2 ** 63), 2 ** 63 - batch  # the rows' seeds seed .. seed + B - 1 must all be int64
        if not lo <= seed <= hi:
            raise ValueError(f"{op}: seed must be in [{lo}, {hi}] so that seed + b fits int64 for each of the "
                             f"B={batch} rows, got {seed}")
        return int(seed) + torch.arange(batch, dtype=torch.int64, device=device)

    def _graph_choice(self, cuda_graph, stream: bool) -> bool:
        device = self.transformer.wte.weight.device
        if cuda_graph is None:  # on where it is safe: a CUDA model in eval mode, not streaming
            return device.type == "cuda" and not stream and not self.training
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"GPT.generate: cuda_graph must be None or a bool, got {type(cuda_graph).__name__}")
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"GPT.generate: cuda_graph=True needs a model on a CUDA device, this one is on {device}")
        if cuda_graph and self.training:
            raise ValueError("GPT.generate: cuda_graph=True needs model.eval() (dropout cannot be replayed)")
        return cuda_graph

    def _check_generate(self, input_ids, max_new_tokens, eos_token_id, attention_mask, generator, knobs):
        op = "GPT.generate"
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"{op}: input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype != torch.int64 or input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"{op}: input_ids must be int64 [B, T] with B, T >= 1, got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        device = self.transformer.wte.weight.device
        if input_ids.device != device:
            raise ValueError(f"{op}: input_ids is on {input_ids.device} but the model is on {device}")
        b, t = input_ids.shape
        ctx = self.config.block_size
        if t > ctx:
            raise ValueError(f"{op}: the prompt has {t} tokens, longer than the context (block_size={ctx})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise ValueError(f"{op}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if t + max_new_tokens > ctx:
            raise ValueError(f"{op}: the prompt ({t} tokens) and max_new_tokens={max_new_tokens} do not fit in the "
                             f"context (block_size={ctx}); ask for at most {ctx - t} new tokens")
        vocab = self.config.vocab_size
        bad_eos = isinstance(eos_token_id, bool) or not isinstance(eos_token_id, numbers.Integral)
        if eos_token_id is not None and (bad_eos or not 0 <= eos_token_id < vocab):
            raise ValueError(f"{op}: eos_token_id must be None or an int in [0, {vocab}), got {eos_token_id!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator is not None and generator.device.type != device.type:
            raise ValueError(f"{op}: generator is on {generator.device} but the model is on {device}")
        # The knobs are checked once here, so that every step can run sample_tokens with validate=False (a check
        # per step would synchronise with the GPU per token). filter_logits on a dummy row checks the same rules.
        ops.filter_logits(torch.zeros(b, 1, device=device), **knobs, validate=True)
        lo_hi = [input_ids.min(), input_ids.max()]
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor):
                raise TypeError(f"{op}: attention_mask must be a torch.Tensor or None, got "
                                f"{type(attention_mask).__name__}")
            if attention_mask.shape != input_ids.shape or attention_mask.device != device:
                raise ValueError(f"{op}: attention_mask must be [B, T] = {list(input_ids.shape)} on {device}, got "
                                 f"{tuple(attention_mask.shape)} on {attention_mask.device}")
            m = attention_mask
            lo_hi += [((m != 0) & (m != 1)).any(), (m[:, 1:] < m[:, :-1]).any(), (m[:, -1] != 1).any()]
        flags = torch.stack([v.to(torch.int64) for v in lo_hi]).tolist()  # one host sync for every check
        if flags[0] < 0 or flags[1] >= vocab:
            raise ValueError(f"{op}: input_ids must hold token ids in [0, {vocab}), got values in "
                             f"[{flags[0]}, {flags[1]}]")
        if attention_mask is not None and any(flags[2:]):
            raise ValueError(f"{op}: attention_mask must hold 0 (padding) and 1 (token), with each prompt padded "
                             "on the left (its zeros first) and ending in a token")

    @torch.no_grad()
    def _generate_steps(self, input_ids, max_new_tokens, knobs, eos_token_id, attention_mask, generator,
                        stream, cuda_graph, seeds=None, kv_block_size=None) -> Iterator[torch.Tensor]:
        """Yields each step's new tokens [B]; the arguments were checked by generate()."""
        repetition_penalty = knobs["repetition_penalty"]
        if max_new_tokens == 0:
            return
        b, t = input_ids.shape
        device = input_ids.device
        cols = torch.arange(t, device=device)
        if attention_mask is None:
            lengths = torch.full((b,), t, dtype=torch.int64, device=device)
            ids = input_ids
        else:
            # Left padding -> right padding: roll each row left by its padding, so that token i of every prompt
            # sits at position i and plain causal attention serves the prefill. Each cache then forgets the
            # padding tokens (set_lengths), and the decoded tokens overwrite them.
            lengths = attention_mask.to(torch.int64).sum(dim=1)
            ids = input_ids.gather(1, (cols[None, :] + (t - lengths)[:, None]) % t)
        # Per-row seeds promise the same tokens whatever the batch: the caches then have the context's size (not the
        # longest prompt's) and decode is batch-invariant, whose split count follows the cache size. The context is
        # entered around each model call only: this generator's body runs inside the caller's context, so a `with`
        # held across a yield would leak into the caller's code between tokens (streaming).
        invariant = seeds is not None
        size = self.config.block_size if invariant else t + max_new_tokens
        if kv_block_size is None:
            caches = self.new_caches(b, size)
        else:
            # Paged: each row's blocks hold its prompt and new tokens; the right-padded prefill writes t slots of every
            # row first (one host read of the lengths, once per generation).
            capacity = [max(t, n + max_new_tokens) for n in lengths.tolist()]
            caches = self.new_caches(b, size, block_size=kv_block_size, capacity=capacity)
        with batch_invariant_decode(invariant):
            hidden = self.hidden_states(ids, cols, caches)  # (B, T, C)
        for cache in caches:
            cache.set_lengths(lengths)
        logits = self.lm_head(hidden[torch.arange(b, device=device), lengths - 1])  # (B, V): each prompt's last
        penalize = not (isinstance(repetition_penalty, numbers.Real) and repetition_penalty == 1.0)
        # Scalar knobs become per-row tensors once, rather than being re-created by sample_tokens at every step.
        knobs = {name: value if isinstance(value, torch.Tensor) else
                 torch.full((b,), value, device=device, dtype=torch.int64 if name == "top_k" else torch.float32)
                 for name, value in knobs.items()}
        seen = None
        if penalize:
            # The token ids the repetition penalty looks at, in one buffer of fixed shape: the prompt, then each
            # new token in its column. Columns not (yet) holding a token of the row repeat the row's last prompt
            # token: a token seen twice is penalised once, so the filler changes nothing.
            filler = ids.gather(1, (lengths - 1)[:, None])  # (B, 1)
            seen = torch.where(cols[None, :] < lengths[:, None], ids, filler)
            seen = torch.cat([seen, filler.expand(b, max_new_tokens)], dim=1).contiguous()  # (B, T + max_new)
        with batch_invariant_decode(invariant):  # a CUDA graph captures the split count chosen here
            step = self._decode_graph(caches, b) if cuda_graph else self._decode_step(caches)
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        positions = lengths.clone()
        # Row b's i-th new token uses Philox(seeds[b]) at offset i (per-row seeds; None: the generator's stream).
        offsets = torch.zeros(b, dtype=torch.int64, device=device) if invariant else None
        for i in range(max_new_tokens):
            # The first step checks its real logits (one sync); later steps trust them (no sync per token).
            token = ops.sample_tokens(logits, **knobs, prev_tokens=seen, generator=generator, seeds=seeds,
                                      offsets=offsets, validate=i == 0)
            if eos_token_id is not None:
                token.masked_fill_(finished, eos_token_id)
                finished |= token == eos_token_id
            yield token
            if i + 1 == max_new_tokens:
                break
            if eos_token_id is not None and (stream or (i + 1) % EOS_CHECK_EVERY == 0) and bool(finished.all()):
                break
            if penalize:
                seen[:, t + i] = token
            with batch_invariant_decode(invariant):
                logits = step(token, positions)
            positions += 1
            if invariant:
                offsets += 1

    def new_caches(self, batch_size: int, max_seq_len: int, *, block_size: int | None = None,
                   capacity: list[int] | None = None) -> list[KVCache]:
        """One empty KV cache per block, of the model's dtype and device (paged with ``block_size``/``capacity``:
        genfast.nn.KVCache)."""
        cfg, weight = self.config, self.transformer.wte.weight
        return [KVCache(batch_size, cfg.n_head, max_seq_len, cfg.n_embd // cfg.n_head, dtype=weight.dtype,
                        device=weight.device, block_size=block_size, capacity=capacity) for _ in range(cfg.n_layer)]

    def _decode_step(self, caches: list[KVCache]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The decode step: (token [B], positions [B]) -> next logits [B, V], appending to ``caches``.

        Every tensor it touches has a fixed shape and address (the caches and their lengths are updated in place)
        and nothing in it waits for the host, so the same step is what the CUDA graph captures."""

        def step(token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            with decode_linears():  # on a CPU, the linears multiply by copies laid out for decode (_decode_linear.py)
                hidden = self.hidden_states(token[:, None], positions[:, None], caches)  # (B, 1, C)
                return self.lm_head(hidden[:, -1])

        return step

    def _decode_graph(self, caches: list[KVCache], b: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``_decode_step`` captured once as a CUDA graph; each call copies its inputs in and replays it."""
        device = self.transformer.wte.weight.device
        token_in = torch.zeros(b, dtype=torch.int64, device=device)
        positions_in = caches[0].lengths.clone()
        return capture_decode_step(self._decode_step(caches), (token_in, positions_in), caches)

    # ------------------------------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, allow_nonfinite: bool = False) -> "GPT":
        """A GPT from local files (never a download): ``path`` is one of

        - a run folder of ``genfast train gpt`` (``<out>``; its ``checkpoint/`` is read), or that checkpoint
          folder: config.json ``{"format_version": 2, "recipe": "gpt", "model": {GPTConfig fields}}`` and
          model.safetensors with this class's state dict, found and checked as every loader does
          (``genfast.models._checkpoint``);
        - a Hugging Face GPT-2 folder: config.json (model_type "gpt2") and model.safetensors, or
          pytorch_model.bin (read with torch.load(weights_only=True), which runs no pickled code). The model then
          gives the logits transformers' GPT2LMHeadModel gives on the same checkpoint.

        The files are untrusted: the config is read with bounded size and nesting, its sizes are bounded
        (``gpt_hf.CONFIG_LIMITS``) and compared with the weights' shapes, read from the safetensors header, before
        the model is allocated, and so is the memory loading needs; weights of another dtype kind than the model's,
        or holding NaN/inf (unless ``allow_nonfinite=True``, to debug a diverged run), are refused
        (``genfast.models._checkpoint.check_weights``); every error names the file and the key or tensor at fault.
        Dropout is 0 (an inference model; set ``model.config``'s and the modules' dropout yourself to fine-tune
        with it).
        """
        path = Path(path)
        try:
            folder = find_run_checkpoint(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"GPT.from_pretrained: no config.json in {path} (a Hugging Face GPT-2 folder) or "
                                    f"in {path / CHECKPOINT_DIR} (a run folder of `genfast train gpt`)") from None
        config_file = folder / CONFIG_FILE
        raw = _io.read_json_config(config_file)
        hf = gpt_hf.is_hf_config(raw)
        if hf:
            config = gpt_hf.config_from_hf(raw, config_file, GPTConfig)
        else:
            check_run_config(raw, folder, "gpt", path)
            config = _config_from_run(raw["model"], config_file)
        weights, state = _read_weights(folder, config, hf=hf)
        model = cls(config).to(device=device, dtype=dtype)
        check_weights(state, model, weights, allow_nonfinite=allow_nonfinite)
        model.load_state_dict(state, strict=True)
        return model

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write config.json and model.safetensors in Hugging Face's GPT-2 format (each file atomically)."""
        hf_config = gpt_hf.hf_config(self.config, self.transformer.wte.weight.dtype)
        tensors = gpt_hf.hf_state(self.state_dict())
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save as safetensors_bytes

        _io.write_atomic(path / "model.safetensors", safetensors_bytes(tensors, metadata={"format": "pt"}))
        _io.write_atomic(path / CONFIG_FILE, json.dumps(hf_config, indent=2, sort_keys=True).encode())
        return path


def _config_from_run(model: dict, source: Path) -> GPTConfig:
    """GPTConfig of a run folder's config.json "model" object (the run's format and recipe already checked by
    check_run_config): sizes bounded by gpt_hf.CONFIG_LIMITS, dropout 0 (an inference model)."""
    where = f"GPT.from_pretrained: {source}"
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(str(k) for k in set(model) - known)
    if unknown:
        raise ValueError(f"{where}: key 'model' has unknown fields {unknown[:5]}; known: {sorted(known)}")
    for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        gpt_hf.config_size(model, key, getattr(GPTConfig, key), where, f"model.{key}")
    if model.get("n_inner") is not None:
        gpt_hf.config_size(model, "n_inner", None, where, "model.n_inner")
    try:
        return GPTConfig.from_dict({**model, "dropout": 0.0})
    except ValueError as exc:
        raise ValueError(f"{where}: key 'model': {exc}") from exc


def _read_weights(folder: Path, config: GPTConfig, *, hf: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the weights file, our state dict with the head tied) of a run's or a Hugging Face folder; the tensors'
    names and shapes are checked against ``config``, and the memory loading needs against this machine's, before
    anything of the model's size is allocated (a pytorch_model.bin has no header: its size is checked instead)."""
    weights = gpt_hf.weights_file(folder) if hf else folder / "model.safetensors"
    if weights.suffix == ".bin":
        state = gpt_hf.our_state(gpt_hf.read_bin(weights))
        _check_shapes({name: tuple(t.shape) for name, t in state.items()}, config, weights)
        return weights, _tie_head(state, weights)
    header = _io.read_safetensors_header(weights)
    shapes = {name: info.shape for name, info in header.items()}
    _check_shapes(gpt_hf.our_shapes(shapes) if hf else shapes, config, weights)
    _check_memory(header, config, weights)
    state = _io.load_safetensors_state(weights)
    return weights, _tie_head(gpt_hf.our_state(state) if hf else state, weights)


def _expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Our state dict's shapes for ``config``, computed without building the model (the tied head left out)."""
    c, w, v = config.n_embd, config.mlp_width, config.vocab_size
    shapes = {"transformer.wte.weight": (v, c), "transformer.wpe.weight": (config.block_size, c),
              "transformer.ln_f.weight": (c,)}
    per_block = {"ln_1.weight": (c,), "ln_2.weight": (c,), "attn.c_attn.weight": (3 * c, c),
                 "attn.c_proj.weight": (c, c), "mlp.c_fc.weight": (w, c), "mlp.c_proj.weight": (c, w)}
    if config.bias:
        shapes["transformer.ln_f.bias"] = (c,)
        per_block.update({"ln_1.bias": (c,), "ln_2.bias": (c,), "attn.c_attn.bias": (3 * c,),
                          "attn.c_proj.bias": (c,), "mlp.c_fc.bias": (w,), "mlp.c_proj.bias": (c,)})
    for i in range(config.n_layer):
        shapes.update({f"transformer.h.{i}.{name}": shape for name, shape in per_block.items()})
    return shapes


def _check_shapes(shapes: dict[str, tuple[int, ...]], config: GPTConfig, source: Path) -> None:
    """The tensors in ``source`` (our name -> shape) are exactly the model's for ``config``; ValueError naming
    the file and the first mismatches otherwise. Runs before anything of the model's size is allocated."""
    expected = _expected_shapes(config)
    ours = {name: tuple(shape) for name, shape in shapes.items()}
    head = ours.pop("lm_head.weight", None)
    unexpected, missing = sorted(set(ours) - set(expected)), sorted(set(expected) - set(ours))
    if unexpected or missing:
        raise ValueError(f"GPT.from_pretrained: the weights in {source} are not a GPT's for its config.json "
                         f"(another architecture, or a config that does not match): unexpected {unexpected[:5]}, "
                         f"missing {missing[:5]}")
    wrong = [f"{name} {ours[name]} (config.json needs {shape})" for name, shape in expected.items()
             if ours[name] != shape]
    if head is not None and head != expected["transformer.wte.weight"]:
        wrong.append(f"lm_head.weight {head} (tied to the token embedding {expected['transformer.wte.weight']})")
    if wrong:
        raise ValueError(f"GPT.from_pretrained: tensors in {source} do not match its config.json: "
                         f"{'; '.join(wrong[:5])}")


def _check_memory(header: dict[str, _io.TensorInfo], config: GPTConfig, source: Path) -> None:
    """Loading holds the file's tensors and the fp32 model at once: refuse it, naming the largest tensor, where
    that exceeds this machine's memory (a sparse file can claim gigabytes it does not hold on disk)."""
    file_bytes = sum(info.numel * _io.SAFETENSORS_DTYPE_BYTES[info.dtype] for info in header.values())
    model_bytes = 4 * sum(math.prod(shape) for shape in _expected_shapes(config).values())
    name, info = max(header.items(), key=lambda item: item[1].numel)
    _io.check_fits_memory(file_bytes + model_bytes, f"GPT.from_pretrained: {source} (largest tensor {name!r}, "
                                                    f"{info.dtype} {list(info.shape)})")


def _tie_head(state: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """``state`` with lm_head.weight the token embedding (a file's own head must equal it, as GPT-2 ties them)."""
    head = state.pop("lm_head.weight", None)
    wte = state["transformer.wte.weight"]
    if head is not None and not torch.equal(head, wte):
        raise ValueError(f"GPT.from_pretrained: lm_head.weight in {source} differs from the token embedding; "
                         "genfast's GPT ties them, as GPT-2 does")
    state["lm_head.weight"] = wte
    return state


__all__ = ["GPT", "GPTConfig", "PRESETS"]
