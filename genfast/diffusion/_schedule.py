"""Noise schedules: betas, inference timesteps and scheduler options, as diffusers defines them.

Values match diffusers' DDPMScheduler/DDIMScheduler bit for bit (same float32 betas, same integer
timesteps), so a genfast scheduler built from a diffusers config walks the same chain.
"""

from __future__ import annotations

import math
import numbers

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


def _beta(name: str, option: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: {option} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name}: {option} must be in (0, 1), got {value}")
    return value


def checked_betas(name: str, num_train_timesteps: int, beta_start, beta_end, beta_schedule: str, trained_betas,
                  rescale_betas_zero_snr: bool) -> torch.Tensor:
    """:func:`make_betas`, refusing a schedule whose steps would be NaN or infinite.

    Every beta must lie in (0, 1) (a beta of 0 or less, or of 1 or more, makes sqrt(1 - beta) or the variance
    undefined), ``beta_start <= beta_end`` (noise grows along the chain), and the cumulative product of the
    alphas must stay above 0 in float32 until the last step (zero-terminal-SNR rescaling sets that last one to 0
    on purpose, as diffusers does).
    """
    if trained_betas is None and beta_schedule in ("linear", "scaled_linear"):
        start, end = _beta(name, "beta_start", beta_start), _beta(name, "beta_end", beta_end)
        if start > end:
            raise ValueError(f"{name}: beta_start={start} must not exceed beta_end={end} (betas grow along the chain)")
    if trained_betas is not None:
        try:
            given = np.asarray(trained_betas, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name}: trained_betas must be a sequence of real numbers ({error})") from None
        if given.shape != (num_train_timesteps,):
            raise ValueError(f"{name}: trained_betas must hold num_train_timesteps={num_train_timesteps} values, "
                             f"got shape {given.shape}")
        bad = np.flatnonzero(~((given > 0) & (given < 1)))
        if bad.size:
            raise ValueError(f"{name}: trained_betas must all lie in (0, 1), got trained_betas[{bad[0]}] = "
                             f"{given[bad[0]]}")
    betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, False)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if not bool(alphas_cumprod[-1] > 0):
        first = int(torch.nonzero(alphas_cumprod <= 0)[0])
        raise ValueError(f"{name}: the schedule's alphas_cumprod reaches 0 in float32 at timestep {first} of "
                         f"num_train_timesteps={num_train_timesteps} (betas too large for so many steps)")
    return zero_terminal_snr(betas) if rescale_betas_zero_snr else betas
