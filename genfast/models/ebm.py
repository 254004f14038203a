"""An energy-based model of images, sampled by Langevin dynamics and trained by contrastive divergence.

The model is one scalar function E(x) (low on data, high elsewhere) defining p(x) ∝ exp(-E(x)). Nothing generates
images directly: a sample is made by K steps of Langevin dynamics on E,

    x <- clamp(x - step_size * dE/dx + noise_scale * eps, -1, 1),     eps ~ N(0, I),

each step one fused ``genfast.ops.langevin_step`` kernel (the update, the Philox noise and the clamp in one pass)
after autograd has given dE/dx. Training (Du & Mordatch 2019, "Implicit Generation and Generalization in
Energy-Based Models") lowers the energy of data and raises that of the model's own samples:

    loss = E(x_data).mean() - E(x_model).mean() + alpha * (E(x_data)^2 + E(x_model)^2).mean()

where the last term keeps energies near zero. Short chains work because they start from a replay buffer of
earlier samples (95%) or from uniform noise (5%): chains are continued across training steps. The buffer is a
registered buffer of the module, so it is saved and resumed with the weights.

Spectral normalization on every layer keeps E Lipschitz, which keeps its gradients, and so the chains, stable.
Activations are SiLU: Langevin needs a smooth gradient, which ReLU's kinks would break.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genfast.models._checkpoint import build_and_load, read_run
from genfast.models._config import ModelConfig, check_choice, check_int, check_number
from genfast.ops import langevin_step

IMAGE_SIZES = (16, 32, 64)


@dataclass
class EBMConfig(ModelConfig):
    image_size: int = 32  # 16, 32 or 64
    channels: int = 1  # 1 (grayscale) or 3 (RGB)
    features: int = 32  # channels of the first convolution; doubled at each halving of the image
    spectral_norm: bool = True
    buffer_size: int = 8192  # replay-buffer images
    step_size: float = 10.0  # Langevin: x -= step_size * dE/dx (on the clipped gradient)
    noise_scale: float = 0.005  # Langevin: + noise_scale * eps
    grad_clip: float = 0.03  # |dE/dx| is clipped to this per pixel before the step (0 turns it off)
    reinit_fraction: float = 0.05  # fraction of chains started from fresh noise rather than the buffer

    def __post_init__(self):
        check_choice(self, "image_size", IMAGE_SIZES)
        check_choice(self, "channels", (1, 3))
        check_int(self, "features", maximum=1024)
        check_int(self, "buffer_size", maximum=1 << 20)
        if not isinstance(self.spectral_norm, bool):
            raise ValueError(f"EBMConfig.spectral_norm must be true or false, got {self.spectral_norm!r}")
        for name in ("step_size", "noise_scale", "grad_clip"):
            check_number(self, name, minimum=0.0)
        check_number(self, "reinit_fraction", minimum=0.0)
        if self.reinit_fraction > 1:
            raise ValueError(f"EBMConfig.reinit_fraction must be in [0, 1], got {self.reinit_fraction!r}")


def build_energy_net(config: EBMConfig) -> nn.Sequential:
    """[B, C, S, S] -> [B, 1]: stride-2 convolutions down to 4x4, then one linear layer."""
    wrap = nn.utils.parametrizations.spectral_norm if config.spectral_norm else (lambda module: module)
    width = config.features
    layers: list[nn.Module] = [wrap(nn.Conv2d(config.channels, width, 3, 1, 1)), nn.SiLU()]
    size = config.image_size
    while size > 4:
        layers += [wrap(nn.Conv2d(width, width * 2, 4, 2, 1)), nn.SiLU()]  # halves H and W
        width, size = width * 2, size // 2
    layers += [nn.Flatten(), wrap(nn.Linear(width * 4 * 4, 1))]
    return nn.Sequential(*layers)


class EBM(nn.Module):
    """E(x) for images in [-1, 1], a Langevin sampler over it, and the replay buffer its chains continue from."""

    def __init__(self, config: EBMConfig | None = None):
        super().__init__()
        self.config = config or EBMConfig()
        c = self.config
        self.net = build_energy_net(c)
        # Uniform noise in [-1, 1] until training fills it with samples; float32 whatever the model's dtype.
        self.register_buffer("replay", torch.rand(c.buffer_size, c.channels, c.image_size, c.image_size) * 2 - 1)

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, S, S] -> energies [B] (lower is more probable)."""
        c = self.config
        if x.dim() != 4 or tuple(x.shape[1:]) != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"EBM.energy: x must have shape [B, {c.channels}, {c.image_size}, {c.image_size}], "
                             f"got {list(x.shape)}")
        return self.net(x).squeeze(1)

    forward = energy

    def energy_grad(self, x: torch.Tensor) -> torch.Tensor:
        """dE/dx for a batch (the sum of energies' gradient: each image's own), without touching parameter grads."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.energy(x).sum(), x)
        return grad

    def langevin(self, x: torch.Tensor, steps: int, *, generator: torch.Generator | None = None,
                 trajectory_every: int = 0) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run ``steps`` Langevin steps from x [B, C, S, S]; returns the final x (detached, clamped to [-1, 1]).

        With ``trajectory_every=k > 0`` it also returns the chain's states every k steps (the start included),
        which is how ``genfast sample ebm --chain`` draws noise turning into an image.
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"EBM.langevin: steps must be an int >= 0, got {steps!r}")
        c = self.config
        x = x.detach()
        states = [x.clone()] if trajectory_every else []
        for step in range(1, steps + 1):
            grad = self.energy_grad(x)
            if c.grad_clip:
                grad.clamp_(-c.grad_clip, c.grad_clip)
            x = langevin_step(x, grad, c.step_size, c.noise_scale, clamp=(-1.0, 1.0), generator=generator)
            if trajectory_every and step % trajectory_every == 0:
                states.append(x.clone())
        return (x, states) if trajectory_every else x

    def initial_chains(self, n: int, *, generator: torch.Generator | None = None,
                       from_buffer: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Starting points for n chains and the buffer slots they came from (None when all start from noise).

        From the buffer, a ``reinit_fraction`` of the chains restart from uniform noise so that the buffer keeps
        exploring; the slots are drawn without replacement so that ``store`` writes each one once.
        """
        c = self.config
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"EBM: the number of chains must be an int >= 1, got {n!r}")
        device = self.replay.device
        shape = (n, c.channels, c.image_size, c.image_size)
        noise = torch.rand(shape, generator=generator, device=device) * 2 - 1
        if not from_buffer:
            return noise, None
        if n > c.buffer_size:
            raise ValueError(f"EBM: {n} chains need a replay buffer of at least {n} images, "
                             f"the config has buffer_size={c.buffer_size}")
        slots = torch.randperm(c.buffer_size, generator=generator, device=device)[:n]
        fresh = torch.rand(n, generator=generator, device=device) < c.reinit_fraction
        start = torch.where(fresh.view(n, 1, 1, 1), noise, self.replay[slots])
        return start, slots

    @torch.no_grad()
    def store(self, samples: torch.Tensor, slots: torch.Tensor) -> None:
        """Write finished chains back into the buffer slots they were started from."""
        self.replay[slots] = samples.detach().to(self.replay.dtype)

    def sample(self, n: int, steps: int = 60, *, generator: torch.Generator | None = None,
               from_buffer: bool = True) -> torch.Tensor:
        """n images [n, C, S, S] in [-1, 1] after ``steps`` Langevin steps from the buffer (or from noise).

        Sampling does not change the buffer; training does (``contrastive_divergence``).
        """
        start, _ = self.initial_chains(n, generator=generator, from_buffer=from_buffer)
        return self.langevin(start, steps, generator=generator)

    def negatives(self, n: int, steps: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Training's model samples: n buffer chains (some restarted from noise) run ``steps`` Langevin steps and
        stored back into the buffer, so that the next training step continues them."""
        start, slots = self.initial_chains(n, generator=generator)
        samples = self.langevin(start, steps, generator=generator)
        self.store(samples, slots)
        return samples

    def contrastive_divergence(self, data: torch.Tensor, steps: int, *, alpha: float = 0.1,
                               generator: torch.Generator | None = None
                               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training step's loss for a batch of data; continues the buffer's chains and stores them back.

        Returns (loss, stats): stats holds the mean positive (data) and negative (sample) energies as detached
        0-d tensors (no host sync here); their gap E(neg) - E(pos) is what training widens at first.
        (`genfast train ebm` does the same with the energy evaluated through its DDP wrapper.)
        """
        negatives = self.negatives(data.shape[0], steps, generator=generator)
        energies = self.energy(torch.cat([data, negatives.to(data.dtype)]))
        return contrastive_divergence_loss(energies, alpha)

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu", *,
                        allow_nonfinite: bool = False) -> "EBM":
        """The model (energy net and replay buffer) of a `genfast train ebm` run folder or its checkpoint folder."""
        directory, saved = read_run(path, "ebm")
        config = EBMConfig.from_dict(saved["model"])
        return build_and_load(lambda: cls(config), directory, "model",
                              allow_nonfinite=allow_nonfinite).to(device)


def contrastive_divergence_loss(energies: torch.Tensor, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """energies [2B]: the data's B then the samples' B. Returns (loss, {"e_pos", "e_neg"}), see the module doc."""
    e_pos, e_neg = energies.float().chunk(2)
    loss = e_pos.mean() - e_neg.mean() + alpha * (e_pos.pow(2) + e_neg.pow(2)).mean()
    return loss, {"e_pos": e_pos.mean().detach(), "e_neg": e_neg.mean().detach()}
