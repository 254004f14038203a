"""The number-pattern GAN: a generator of sequences of integers that learns to write only multiples of 5.

A sequence is ``seq_len`` integers in ``0 .. vocab-1``; the real data are sequences of multiples of 5 (uniform
over 0, 5, ..., 95). Both networks see a sequence as one-hot vectors [B, L, V].

Discrete outputs and gradients. The generator outputs logits [B, L, V]. What the discriminator sees of a fake
sequence is a *straight-through Gumbel-softmax* sample: in the forward pass exactly one-hot (argmax of
logits + Gumbel noise, i.e. a true sample of softmax(logits)), in the backward pass the gradient of
softmax((logits + Gumbel noise) / tau). We chose this over feeding plain softmax probabilities to D because
real sequences are exactly one-hot: a D fed soft vectors can tell fakes apart by their softness alone (any
entry strictly between 0 and 1) and never has to learn the pattern, while one-hot fakes give D nothing but
the integers themselves to judge. The relaxation is biased, but with a small model and tau = 1 it is the
simplest estimator that trains reliably here.

Sampling integers after training goes through ``genfast.ops.sample_tokens`` (Gumbel-max on the fused
backends, with temperature / top-k / top-p), one row per position.

Quality measure: the mean squared remainder mod 5 of generated integers, E[(x mod 5)^2]: 0 when every
integer is a multiple of 5, 6 for uniform integers. ``EarlyStopping`` stops training on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genfast import ops
from genfast.models._checkpoint import build_and_load, read_run
from genfast.models._config import ModelConfig, check_int, check_ints, check_number


@dataclass
class NumberGANConfig(ModelConfig):
    seq_len: int = 10  # integers per sequence
    vocab: int = 100  # integers 0 .. vocab-1
    modulus: int = 5  # the pattern: multiples of this
    latent_dim: int = 32
    hidden: int = 256
    embed_dim: int = 32  # the discriminator's per-integer embedding
    tau: float = 1.0  # Gumbel-softmax temperature of the relaxed backward pass

    def __post_init__(self):
        check_ints(self, ("seq_len", "vocab", "latent_dim", "hidden", "embed_dim"))
        check_int(self, "modulus", maximum=self.vocab)
        check_number(self, "tau", minimum=1e-6)


def real_sequences(batch: int, config: NumberGANConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """int64 [batch, seq_len]: uniform multiples of ``modulus`` in 0 .. vocab-1 (the data distribution)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    choices = (config.vocab - 1) // config.modulus + 1
    return torch.randint(choices, (batch, config.seq_len), generator=generator) * config.modulus


def mean_squared_remainder(integers: torch.Tensor, modulus: int = 5) -> float:
    """E[(x mod modulus)^2] over all entries of an integer tensor (0 when all are multiples)."""
    if not isinstance(integers, torch.Tensor) or integers.dtype.is_floating_point or integers.numel() == 0:
        raise ValueError("integers must be a non-empty integer tensor")
    return float((integers.remainder(modulus).double() ** 2).mean())


def multiple_fraction(integers: torch.Tensor, modulus: int = 5) -> float:
    """The fraction of entries that are multiples of ``modulus``."""
    if not isinstance(integers, torch.Tensor) or integers.dtype.is_floating_point or integers.numel() == 0:
        raise ValueError("integers must be a non-empty integer tensor")
    return float((integers.remainder(modulus) == 0).double().mean())


def straight_through_gumbel(logits: torch.Tensor, tau: float, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One-hot samples of softmax(logits) (forward) with the gradient of the Gumbel-softmax (backward).

    logits [..., V]; ``uniform`` (same shape, in (0, 1)) is the noise, drawn from the global generator if None
    (passing it makes two runs comparable). Returns float one-hot [..., V] in logits' dtype.
    """
    if uniform is None:
        uniform = torch.rand_like(logits, dtype=torch.float32)
    elif uniform.shape != logits.shape:
        raise ValueError(f"uniform must have the logits' shape {tuple(logits.shape)}, got {tuple(uniform.shape)}")
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(uniform.float().clamp(tiny, 1.0 - 1e-7)))
    soft = F.softmax((logits.float() + gumbel) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return (hard - soft.detach() + soft).to(logits.dtype)


class Generator(nn.Module):
    """latent z [B, latent_dim] -> logits [B, seq_len, vocab]."""

    def __init__(self, config: NumberGANConfig):
        super().__init__()
        self.config = config
        c = config
        self.net = nn.Sequential(
            nn.Linear(c.latent_dim, c.hidden), nn.LeakyReLU(0.2),
            nn.Linear(c.hidden, c.hidden), nn.LeakyReLU(0.2),
            nn.Linear(c.hidden, c.seq_len * c.vocab),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.config.latent_dim:
            raise ValueError(f"z must be [B, {self.config.latent_dim}], got shape {tuple(z.shape)}")
        return self.net(z).view(z.shape[0], self.config.seq_len, self.config.vocab)  # (B, L, V)

    def latent(self, batch: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randn(batch, self.config.latent_dim, generator=generator,
                           device=device or next(self.parameters()).device)

    @torch.no_grad()
    def sample(self, batch: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """int64 [batch, seq_len] integers drawn with genfast.ops.sample_tokens from the generator's logits.

        ``generator`` seeds both the latent and the sampling noise; ``noise`` (uniform [batch * seq_len, vocab])
        replaces the sampling noise (for comparing backends). temperature 0 takes the most likely integer.
        """
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        logits = self(self.latent(batch, generator)).flatten(0, 1)  # (B * L, V)
        tokens = ops.sample_tokens(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=None if noise is not None else generator, noise=noise)
        return tokens.view(batch, self.config.seq_len)

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu", *,
                        allow_nonfinite: bool = False) -> "Generator":
        """The generator of a `genfast train numbergan` run folder (or its checkpoint folder), in eval mode."""
        directory, saved = read_run(path, "numbergan")
        config = NumberGANConfig.from_dict(saved["model"])
        return build_and_load(lambda: cls(config), directory, "generator",
                              allow_nonfinite=allow_nonfinite).to(device).eval()


class Discriminator(nn.Module):
    """one-hot (or relaxed) sequences [B, seq_len, vocab] -> real/fake logit [B].

    Each integer is embedded (a linear map of its one-hot vector, shared by the positions), then an MLP judges the
    whole sequence.
    """

    def __init__(self, config: NumberGANConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Linear(c.vocab, c.embed_dim, bias=False)
        self.net = nn.Sequential(
            nn.Linear(c.seq_len * c.embed_dim, c.hidden), nn.LeakyReLU(0.2),
            nn.Linear(c.hidden, c.hidden), nn.LeakyReLU(0.2),
            nn.Linear(c.hidden, 1),
        )

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        c = self.config
        if onehot.dim() != 3 or onehot.shape[1:] != (c.seq_len, c.vocab):
            raise ValueError(f"onehot must be [B, {c.seq_len}, {c.vocab}], got shape {tuple(onehot.shape)}")
        return self.net(self.embed(onehot).flatten(1)).squeeze(1)  # (B,)

    def one_hot(self, integers: torch.Tensor) -> torch.Tensor:
        """Integer sequences [B, L] as the float one-hot input [B, L, V]."""
        return F.one_hot(integers, self.config.vocab).to(self.embed.weight.dtype)


class EarlyStopping:
    """Stop when the metric (lower is better) reaches ``target`` or has not improved for ``patience`` checks."""

    def __init__(self, target: float = 0.05, patience: int = 20):
        if not target >= 0:
            raise ValueError(f"target must be >= 0, got {target!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive int, got {patience!r}")
        self.target, self.patience = float(target), patience
        self.best = math.inf
        self.since_best = 0

    def update(self, metric: float) -> bool:
        """Record one check; True when training should stop."""
        if metric < self.best:
            self.best, self.since_best = metric, 0
        else:
            self.since_best += 1
        return metric <= self.target or self.since_best >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "since_best": self.since_best}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.since_best = float(state["best"]), int(state["since_best"])
