"""Benchmarks of genfast.models.Transformer (the translator): a training step and greedy decoding.

Providers: each genfast attention backend that can serve the model here (``genfast-triton`` on a GPU; the
interpreter is not timed), ``genfast-auto`` and ``reference`` (every attention through attention's reference
path). The rest of the model (GEMMs, LayerNorm) is the same PyTorch code for all providers, so the ratios show
what the fused attention buys end to end.

- ``translator_train_step``: forward, backward and AdamW step on a batch of B sources of length S and targets of
  length T (bf16 autocast on a GPU, fp32 on a CPU). FLOPs: the standard 6 * parameters * tokens (matmul work,
  attention not included), so TFLOP/s compare across sizes.
- ``translator_greedy_decode``: greedy decoding of B sources to exactly T tokens (the stop token set to bos, which
  is never emitted, so every provider does the same work), with the KV cache and the encoder output projected once
  (the default call: on a GPU the cached step replays as a CUDA graph).
- ``translator_beam_search``: beam search (beam 4) of the same sources to exactly T tokens, likewise.

Sizes: on a GPU the ``base`` model of the paper (d 512, 6 + 6 layers) at B 64, S = T = 128; on a CPU the
``small`` preset at B 16, S = T = 32.
"""

from __future__ import annotations

import math

import torch

import genfast
from benchmarks.harness import BenchCase, genfast_providers
from genfast.models import Transformer, TransformerConfig

FAMILY = "models_transformer"
VOCAB = 1000


def _grid(device: torch.device, quick: bool):
    """(preset, B, S, T) per case."""
    if device.type == "cuda":
        return [("base", 64, 128, 128)] if quick else [("base", 64, 128, 128), ("base", 16, 512, 512)]
    return [("small", 16, 32, 32)]


def _model(device, preset, length):
    torch.manual_seed(0)
    cfg = TransformerConfig.preset(preset, src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, dropout=0.0,
                                   max_positions=max(length + 1, 64))
    return Transformer(cfg).to(device)


def _tokens(device, b, n):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (b, n), generator=g).to(device)


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)


def _train_setup(device, backend, preset, b, s, t):
    def setup():
        model = _model(device, preset, max(s, t)).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        src, tgt = _tokens(device, b, s), _tokens(device, b, t + 1)
        tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]

        def step():
            with genfast.backend(backend), _autocast(device):
                loss = model.loss(src, tgt_in, tgt_out)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    return setup


def _decode_setup(device, backend, preset, b, s, t):
    def setup():
        model = _model(device, preset, max(s, t)).eval()
        src = _tokens(device, b, s)

        def decode():
            # eos=bos, which decoding never emits: every provider decodes exactly t tokens.
            with genfast.backend(backend), _autocast(device):
                return model.greedy_decode(src, max_len=t, eos=model.config.bos_id)

        return decode

    return setup


def _beam_setup(device, backend, preset, b, s, t):
    def setup():
        model = _model(device, preset, max(s, t)).eval()
        src = _tokens(device, b, s)

        def search():
            with genfast.backend(backend), _autocast(device):
                return model.beam_search(src, beam_size=BEAM, max_len=t, eos=model.config.bos_id)

        return search

    return setup


BEAM = 4


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    out = []
    backends = {f"genfast-{name}": name for name in genfast_providers("attention", device)}
    backends.update({"genfast-auto": "auto", "reference": "reference"})
    for preset, b, s, t in _grid(device, quick):
        params = sum(p.numel() for p in _model("meta", preset, max(s, t)).parameters())
        label = f"{preset} B{b} S{s} T{t}"
        train_flops = 6.0 * params * b * (s + t)
        decode_flops = 2.0 * params * b * t  # one forward of the decoder per token, roughly
        for provider, backend in backends.items():
            out.append(BenchCase(FAMILY, "translator_train_step", label, provider,
                                 _train_setup(device, backend, preset, b, s, t), flops=train_flops))
            out.append(BenchCase(FAMILY, "translator_greedy_decode", label, provider,
                                 _decode_setup(device, backend, preset, b, s, t), flops=decode_flops))
            out.append(BenchCase(FAMILY, "translator_beam_search", label, provider,
                                 _beam_setup(device, backend, preset, b, s, t), flops=BEAM * decode_flops))
    return out


def tokens_per_second(case: BenchCase, ms: float) -> float:
    """Target tokens per second of a measured case (train: source + target tokens)."""
    preset, b, s, t = case.case.split()
    b, s, t = int(b[1:]), int(s[1:]), int(t[1:])
    tokens = {"translator_train_step": b * (s + t), "translator_beam_search": BEAM * b * t}.get(case.op, b * t)
    return tokens / (ms / 1e3) if ms > 0 else math.nan


__all__ = ["cases", "tokens_per_second"]
