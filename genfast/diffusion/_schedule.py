"""Noise schedules: betas, inference timesteps and scheduler options, as diffusers defines them.

Values match diffusers' DDPMScheduler/DDIMScheduler bit for bit (same float32 betas, same integer
timesteps), so a genfast scheduler built from a diffusers config walks the same chain.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _cosine_alpha_bar(t: float) -> float:
    # The "squaredcos_cap_v2" schedule (Nichol & Dhariwal 2021): alpha_bar(t) = cos^2(((t + s) / (1 + s)) * pi / 2),
    # s = 0.008, evaluated in float64 as diffusers does.
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas whose cumulative product follows the cosine alpha_bar, each capped at ``max_beta``."""
    n = num_train_timesteps
    betas = [min(1 - _cosine_alpha_bar((i + 1) / n) / _cosine_alpha_bar(i / n), max_beta) for i in range(n)]
    return torch.tensor(betas, dtype=torch.float32)


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(alpha_bar) so the last timestep is pure noise."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = root - last  # now ends at exactly 0 ...
    root = root * (first / (first - last))  # ... and still starts at sqrt(alpha_bar_0)
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
               trained_betas, rescale_betas_zero_snr: bool) -> torch.Tensor:
    """float32 [num_train_timesteps] betas of the chosen schedule (or the given ``trained_betas``)."""
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas, dtype=np.float64), dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":  # the latent-diffusion schedule: linear in sqrt(beta)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    else:
        betas = cosine_betas(num_train_timesteps)
    return zero_terminal_snr(betas) if rescale_betas_zero_snr else betas


def inference_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str,
                        steps_offset: int) -> np.ndarray:
    """The descending int64 timesteps of a sampling run (Lin et al. 2023, Table 2 names the spacings)."""
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64) + steps_offset
    # trailing: count down from the last training timestep in (possibly fractional) strides
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
