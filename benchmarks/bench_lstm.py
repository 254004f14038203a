"""Benchmarks of the LSTM family: the fused cell, token generation and a training step.

- ``lstm_cell`` (forward, and forward + backward): genfast's kernel against the reference, which is the textbook
  eager cell (add the gates, chunk, three sigmoids, two tanh, the update: one PyTorch op each).
- ``generate``: tokens/s of ``LSTMLM.generate`` (the fused cell per layer and step, ``sample_tokens``) against the
  plain PyTorch loop a user writes over the same weights: ``nn.LSTM`` fed one token at a time with its state,
  ``softmax(logits / temperature)`` and ``torch.multinomial``. Same model, same temperature, batch 1 and 32.
- ``train step``: forward, backward and Adam on random windows: the model's default path (nn.LSTM, chosen by these
  rows), the model with ``fused=True`` (a Python loop over genfast.ops.lstm_cell), and a plain nn.Module of
  Embedding + nn.LSTM + Linear.

The ``replaced`` rows time genfast's default call against the plain one alternately (benchmarks/harness.py) and
report the median ratio: generation at batch 1 and 32 (target >= 1.5x) and the training step (target >= 0.97x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness import BenchCase, ReplacedCase, genfast_providers, with_backend
from genfast.models.lstm import LSTMLM, LSTMConfig
from genfast.ops import lstm_cell, lstm_cell_ref

FAMILY = "lstm"
VOCAB = 100  # about a character vocabulary
TEMPERATURE = 0.8


def _model(device: torch.device) -> LSTMLM:
    torch.manual_seed(0)
    return LSTMLM(LSTMConfig.preset("small", vocab_size=VOCAB)).to(device).eval()


def _gen_tokens(quick: bool) -> int:
    return 8 if quick else 32


# ------------------------------------------------------------------------------------------ the cell
def _cell_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    out = []
    shapes = [(1, 128), (32, 256)] if quick else [(1, 128), (32, 128), (32, 512), (256, 1024)]
    for batch, hidden in shapes:
        for backward in (False, True):
            op = "lstm_cell" + (" fwd+bwd" if backward else "")
            label = f"fp32 B{batch} H{hidden}"
            # The least any implementation moves: the two gate tensors and c in, h and c out (backward: x3).
            nbytes = 4 * batch * hidden * (8 + 1 + 2) * (3 if backward else 1)

            def setup(fn, batch=batch, hidden=hidden, backward=backward):
                g = torch.Generator(device).manual_seed(0)
                xg, hg = (torch.randn(batch, 4 * hidden, device=device, generator=g) for _ in range(2))
                c = torch.randn(batch, hidden, device=device, generator=g)
                if not backward:
                    return lambda: fn(xg, hg, c)
                leaves = [t.requires_grad_() for t in (xg, hg, c)]
                grad = torch.ones(batch, hidden, device=device)

                def step():
                    h, c_new = fn(*leaves)
                    torch.autograd.backward((h, c_new), (grad, grad))
                return step

            for name in genfast_providers("lstm_cell", device):
                out.append(BenchCase(FAMILY, op, label, f"genfast-{name}",
                                     lambda setup=setup, name=name: with_backend(name, setup(lstm_cell)),
                                     bytes=nbytes))
            out.append(BenchCase(FAMILY, op, label, "reference", lambda setup=setup: setup(lstm_cell_ref),
                                 bytes=nbytes))
    return out


# ------------------------------------------------------------------------------------------ generation
def plain_generate(model: LSTMLM, prompt: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """What a user writes with PyTorch alone: nn.LSTM one token at a time, softmax and torch.multinomial."""
    with torch.no_grad():
        out, state = model.lstm(model.embed(prompt))
        logits = model.head(out[:, -1])
        tokens = []
        for _ in range(n):
            token = torch.multinomial(torch.softmax(logits / TEMPERATURE, dim=-1), 1, generator=generator)
            tokens.append(token)
            out, state = model.lstm(model.embed(token), state)
            logits = model.head(out[:, -1])
    return torch.cat([prompt, *tokens], dim=1)


def _generation_setup(device: torch.device, batch: int, n: int):
    def setup():
        model = _model(device)
        prompt = torch.randint(0, VOCAB, (batch, 16), device=device, generator=torch.Generator(device).manual_seed(1))
        g_ours, g_plain = torch.Generator(device).manual_seed(2), torch.Generator(device).manual_seed(2)
        ours = lambda: model.generate(prompt, n, temperature=TEMPERATURE, generator=g_ours)  # noqa: E731
        plain = lambda: plain_generate(model, prompt, n, g_plain)  # noqa: E731
        return ours, plain
    return setup


def _generation_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    n = _gen_tokens(quick)
    out = []
    for batch in (1, 32):
        label = f"fp32 small B{batch} {n} tokens"
        setup = _generation_setup(device, batch, n)
        out.append(BenchCase(FAMILY, "generate", label, "genfast", lambda setup=setup: setup()[0]))
        out.append(BenchCase(FAMILY, "generate", label, "torch-eager-multinomial", lambda setup=setup: setup()[1]))
    return out


# ------------------------------------------------------------------------------------------ training
class PlainLSTMLM(nn.Module):
    """The same network as a user writes it with PyTorch alone."""

    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.n_embd)
        self.lstm = nn.LSTM(config.n_embd, config.n_hidden, num_layers=config.n_layer, batch_first=True,
                            dropout=config.dropout)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.n_hidden, config.vocab_size)

    def forward(self, idx, targets):
        out, _ = self.lstm(self.drop(self.embed(idx)))
        logits = self.head(self.drop(out))
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _train_setup(device: torch.device, kind: str, batch: int, seq_len: int):
    def setup():
        torch.manual_seed(0)
        config = LSTMConfig.preset("small", vocab_size=VOCAB)
        model = (PlainLSTMLM(config) if kind == "plain" else LSTMLM(config)).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator(device).manual_seed(3)
        x, y = (torch.randint(0, VOCAB, (batch, seq_len), device=device, generator=g) for _ in range(2))
        kwargs = {"fused": True} if kind == "fused" else {}

        def step():
            _, loss = model(x, y, **kwargs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step
    return setup


def _train_shape(quick: bool) -> tuple[int, int]:
    return (8, 16) if quick else (32, 64)


def _train_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    batch, seq_len = _train_shape(quick)
    label = f"fp32 small B{batch} T{seq_len}"
    return [BenchCase(FAMILY, "train step", label, provider, _train_setup(device, kind, batch, seq_len))
            for provider, kind in (("genfast", "default"), ("genfast-lstm_cell", "fused"), ("torch-nn-lstm", "plain"))]


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    return _cell_cases(device, quick) + _generation_cases(device, quick) + _train_cases(device, quick)


def replaced(device: torch.device, quick: bool = False) -> list[ReplacedCase]:
    n = _gen_tokens(quick)
    rows = [ReplacedCase(FAMILY, "LSTMLM.generate", f"fp32 small B{batch} {n} tokens", "nn.LSTM + torch.multinomial",
                         _generation_setup(device, batch, n)) for batch in (1, 32)]
    batch, seq_len = _train_shape(quick)

    def train_pair():
        return _train_setup(device, "default", batch, seq_len)(), _train_setup(device, "plain", batch, seq_len)()

    rows.append(ReplacedCase(FAMILY, "LSTMLM train step", f"fp32 small B{batch} T{seq_len}", "nn.LSTM module",
                             train_pair))
    return rows


__all__ = ["cases", "replaced", "plain_generate", "PlainLSTMLM"]
