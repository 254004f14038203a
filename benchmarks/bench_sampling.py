"""Benchmarks of sample_tokens: genfast's sort-free kernels against the sort-based reference.

Every provider draws one token per row with the same knobs. genfast is timed twice: the default call
(``genfast-<backend>``, ``validate=True``: the kernels flag bad values as they read the logits and one host
synchronisation raises them) and ``genfast-<backend>-validate-off`` (``validate=False``, what a generation
loop on a GPU passes to avoid that synchronisation). genfast draws its Philox noise inside the kernel (for kept
tokens only); the reference and its torch.compile'd version run with ``validate=False`` and get a pre-drawn
uniform noise tensor, so their timings include neither checks nor drawing B*V random numbers: the comparison
flatters them.

``genfast-<backend>-row-seeds`` is the default call with per-row seeds (``seeds=``, ``offsets=``: each row's
token independent of the batch) instead of one generator seed: beside ``genfast-<backend>`` it gives the cost of
that guarantee (a per-row seed load, and the offsets' range check folded into the same synchronisation).
"""

from __future__ import annotations

import torch

from benchmarks.harness import BenchCase, genfast_providers, with_backend
from genfast.ops import sample_tokens, sample_tokens_ref


def _shapes(device: torch.device, quick: bool) -> list[tuple[str, int, int, dict]]:
    top = dict(top_k=50, top_p=0.9)
    if device.type == "cuda":
        vocab = 8192 if quick else 128256
        return [("top_k=50 top_p=0.9", 64, vocab, top), ("top_k=50 top_p=0.9", 1, vocab, top),
                ("top_p=0.9", 64, vocab, dict(top_p=0.9)), ("greedy", 64, vocab, dict(temperature=0.0))]
    vocab = 4096 if quick else 50257
    return [("top_k=50 top_p=0.9", 32, vocab, top), ("top_p=0.9", 32, vocab, dict(top_p=0.9)),
            ("greedy", 32, vocab, dict(temperature=0.0))]


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    out = []
    for knobs, batch, vocab, kw in _shapes(device, quick):
        label = f"fp32 [{batch}, {vocab}] {knobs}"
        nbytes = 4 * batch * vocab  # the logits, read once: the least any implementation must move

        def setup_logits(batch=batch, vocab=vocab):
            g = torch.Generator(device).manual_seed(0)
            return torch.randn(batch, vocab, device=device, generator=g) * 4

        def ours(name, validate, kw=kw, setup_logits=setup_logits):
            def setup():
                x = setup_logits()
                g = torch.Generator(device).manual_seed(1)
                return with_backend(name, lambda: sample_tokens(x, generator=g, validate=validate, **kw))
            return setup

        def ours_row_seeds(name, kw=kw, setup_logits=setup_logits):
            def setup():
                x = setup_logits()
                seeds = torch.arange(x.shape[0], device=device) + 1  # one request per row, each at step 7
                offsets = torch.full_like(seeds, 7)
                return with_backend(name, lambda: sample_tokens(x, seeds=seeds, offsets=offsets, **kw))
            return setup

        def reference(compiled=False, kw=kw, setup_logits=setup_logits):
            def setup():
                x = setup_logits()
                noise = torch.rand(x.shape, device=device).clamp_min(1e-7)
                fn = lambda x, noise: sample_tokens_ref(x, noise=noise, validate=False, **kw)  # noqa: E731
                if compiled:
                    fn = torch.compile(fn, fullgraph=True)
                return with_backend("reference", lambda: fn(x, noise))
            return setup

        for name in genfast_providers("sample_tokens", device):
            out.append(BenchCase("sampling", "sample_tokens", label, f"genfast-{name}", ours(name, True),
                                 bytes=nbytes))
            out.append(BenchCase("sampling", "sample_tokens", label, f"genfast-{name}-validate-off",
                                 ours(name, False), bytes=nbytes))
            out.append(BenchCase("sampling", "sample_tokens", label, f"genfast-{name}-row-seeds",
                                 ours_row_seeds(name), bytes=nbytes))
        out.append(BenchCase("sampling", "sample_tokens", label, "reference", reference(), bytes=nbytes))
        out.append(BenchCase("sampling", "sample_tokens", label, "torch-compile", reference(True), bytes=nbytes))
    return out


__all__ = ["cases"]
