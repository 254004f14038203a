"""DDPM and DDIM schedulers whose every step is one fused kernel (genfast.ops.scheduler_step).

Constructor options, their defaults and ``set_timesteps`` follow diffusers' DDPMScheduler and
DDIMScheduler, so ``DDIMScheduler.from_config(pipe.scheduler.config)`` works. What differs:

- ``step(model_output, timestep, sample, generator=None, noise=None, *, ...)`` adds classifier-free
  guidance (``model_output_uncond``, ``guidance_scale``) fused into the step; DDIM takes ``eta`` and
  ``use_clipped_model_output`` as keywords. It returns ``SchedulerOutput(prev_sample)`` (or the tuple
  ``(prev_sample,)`` with ``return_dict=False``): the fused kernel does not write the predicted x0.
- Noise drawn inside comes from genfast's Philox stream seeded from ``generator``, not from
  ``torch.randn``; pass ``noise`` to use your own (diffusers' ``variance_noise``).
- Options genfast does not implement (thresholding, learned variances) raise ValueError instead of
  being ignored.

At ``set_timesteps`` the scheduler turns the alphas into one row of coefficients per step (layout in
genfast/ops/diffusion.py); a step passes its row, a view on the device, to the fused op, on the backend in
force (its reference, ``scheduler_step_ref``, under "reference"). The rows are tested against diffusers'
own step (tests/test_schedulers.py), which is the specification of the schedule.

No step synchronises the host with the GPU: a timestep given as an int or CPU tensor is looked up on
the host, an element of ``scheduler.timesteps`` (as a loop over it yields) by its position, and any
other device tensor on the device.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
import torch

from genfast._io import check_fits_memory
from genfast.diffusion import _schedule
from genfast.ops import _checks
from genfast.ops import diffusion as _ops


@dataclasses.dataclass
class SchedulerOutput:
    """What ``step`` returns with ``return_dict=True``: the sample at the previous timestep."""

    prev_sample: torch.Tensor


# Host memory a scheduler takes per training timestep at construction: DDPMScheduler's per-step lookup of every
# timestep (Python ints) measured 1.06 KB a step at 4M steps (peak RSS; DDIM's float tables 29 B), so the worst.
SCHEDULE_BYTES_PER_STEP = 1100


class _Scheduler:
    """What DDPM and DDIM share: options, schedule tables, timestep lookup, noise, add_noise."""

    order = 1
    init_noise_sigma = 1.0
    # Options of sibling diffusers schedulers that configure their own step, not this one, and that
    # diffusers also ignores here (a pipeline's config often carries them when schedulers are swapped).
    _foreign_options: frozenset[str] = frozenset({"skip_prk_steps"})

    def _configure(self, options: dict) -> None:
        name = type(self).__name__
        T = options["num_train_timesteps"]
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"{name}: num_train_timesteps must be a positive int, got {T!r}")
        # A config file's T sizes every table below: refuse one beyond this machine's memory in one line naming
        # the option, not in the allocator (10**10 steps asked for 40 GB of betas).
        check_fits_memory(T * SCHEDULE_BYTES_PER_STEP, f"{name}: num_train_timesteps={T}")
        if options["trained_betas"] is None and options["beta_schedule"] not in _schedule.BETA_SCHEDULES:
            raise ValueError(f"{name}: beta_schedule must be one of {', '.join(_schedule.BETA_SCHEDULES)}, "
                             f"got {options['beta_schedule']!r}")
        if options["prediction_type"] not in _schedule.PREDICTION_TYPES:
            raise ValueError(f"{name}: prediction_type must be one of {', '.join(_schedule.PREDICTION_TYPES)}, "
                             f"got {options['prediction_type']!r}")
        if options["timestep_spacing"] not in _schedule.TIMESTEP_SPACINGS:
            raise ValueError(f"{name}: timestep_spacing must be one of {', '.join(_schedule.TIMESTEP_SPACINGS)}, "
                             f"got {options['timestep_spacing']!r}")
        if options["thresholding"]:
            raise ValueError(f"{name}: thresholding=True (dynamic thresholding) is not supported by genfast")
        if not options["clip_sample_range"] > 0:
            raise ValueError(f"{name}: clip_sample_range must be > 0, got {options['clip_sample_range']!r}")
        steps_offset = options["steps_offset"]
        if isinstance(steps_offset, bool) or not isinstance(steps_offset, int) or steps_offset < 0:
            raise ValueError(f"{name}: steps_offset must be a non-negative int, got {steps_offset!r}")
        self.config = dict(options)
        self._cache: dict = {}
        self.betas = _schedule.checked_betas(name, T, options["beta_start"], options["beta_end"],
                                             options["beta_schedule"], options["trained_betas"],
                                             options["rescale_betas_zero_snr"])
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.from_numpy(np.arange(0, T)[::-1].copy())
        self._steps: list[int] | None = None  # host copy of the timesteps a step may be called with

    # ------------------------------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, config: dict, **overrides):
        """A scheduler from a diffusers scheduler config dict (``pipe.scheduler.config`` or its JSON).

        diffusers' bookkeeping keys (``_class_name``, ``_diffusers_version``, any ``_``-prefixed key) are
        skipped; an option this scheduler does not know raises ValueError naming it.
        """
        if not hasattr(config, "items"):
            raise TypeError(f"{cls.__name__}.from_config: config must be a dict, got {type(config).__name__}")
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        kwargs = {}
        for key, value in {**dict(config.items()), **overrides}.items():
            if key.startswith("_") or key in cls._foreign_options:
                continue
            if key not in known:
                raise ValueError(f"{cls.__name__}.from_config: unknown option {key!r} "
                                 f"(genfast implements: {', '.join(sorted(known))})")
            kwargs[key] = value
        return cls(**kwargs)

    def __len__(self) -> int:
        return self.config["num_train_timesteps"]

    # ------------------------------------------------------------------------------------------ timesteps
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the ``num_inference_steps`` timesteps of a sampling run; ``timesteps`` goes to ``device``."""
        name = type(self).__name__
        T = self.config["num_train_timesteps"]
        n = num_inference_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name}.set_timesteps: num_inference_steps must be a positive int, got {n!r}")
        if n > T:
            raise ValueError(f"{name}.set_timesteps: num_inference_steps={n} cannot exceed num_train_timesteps={T}")
        steps = _schedule.inference_timesteps(T, n, self.config["timestep_spacing"], self.config["steps_offset"])
        if steps.max() >= T:
            raise ValueError(f"{name}.set_timesteps: steps_offset={self.config['steps_offset']} puts timestep "
                             f"{int(steps.max())} past num_train_timesteps={T}")
        self.num_inference_steps = n
        self._build(steps, device)

    def _build(self, steps: np.ndarray, device) -> None:
        """Per-step tables: timesteps, the alphas each step uses, and a cache of coefficient tables."""
        self._steps = [int(t) for t in steps]
        self._position = {t: i for i, t in enumerate(self._steps)}
        prev = self._previous_timesteps(steps)
        alphas = self.alphas_cumprod
        self._t_table = torch.from_numpy(steps.copy())  # int64 [n]
        self._alpha_t = alphas[self._t_table]  # float32 [n]
        self._alpha_prev = torch.stack([alphas[p] if p >= 0 else self._final_alpha_cumprod() for p in prev])
        self.timesteps = self._t_table.to(device)
        self._cache: dict = {}

    def _on(self, key, device: torch.device, make) -> torch.Tensor:
        """A table on ``device``, built (and copied there) once."""
        full_key = (key, str(device))
        if full_key not in self._cache:
            self._cache[full_key] = make().to(device)
        return self._cache[full_key]

    def _step_index(self, timestep, device: torch.device):
        """The position of ``timestep`` in the schedule: an int, or a 0-d int64 tensor on ``device``."""
        name = f"{type(self).__name__}.step"
        if self._steps is None:
            raise ValueError(f"{name}: call set_timesteps before step")
        if isinstance(timestep, bool) or not isinstance(timestep, (int, np.integer, torch.Tensor)):
            raise TypeError(f"{name}: timestep must be an int or a one-element tensor, got {type(timestep).__name__}")
        if isinstance(timestep, torch.Tensor):
            if timestep.numel() != 1:
                raise ValueError(f"{name}: timestep must hold one value, got shape {tuple(timestep.shape)}")
            if timestep.is_complex() or timestep.dtype == torch.bool:
                raise TypeError(f"{name}: timestep must be an integer tensor, got {timestep.dtype}")
            if timestep.device.type != "cpu":
                return self._device_step_index(timestep)
            value = timestep.item()
            if value != int(value):
                raise ValueError(f"{name}: timestep {value} is not an integer")
            timestep = int(value)
        position = self._position.get(int(timestep))
        if position is None:
            raise ValueError(f"{name}: timestep {int(timestep)} is not in the schedule set by set_timesteps "
                             f"({self._steps[0]} .. {self._steps[-1]}, {len(self._steps)} steps)")
        return position

    def _device_step_index(self, timestep: torch.Tensor):
        base = self.timesteps
        # A loop `for t in scheduler.timesteps` yields views of that tensor: their position is their
        # storage offset, which the host knows without reading the device.
        if (timestep.dim() == 0 and base.device == timestep.device
                and timestep.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()):
            delta = timestep.storage_offset() - base.storage_offset()
            if delta % base.stride(0) == 0 and 0 <= delta // base.stride(0) < base.numel():
                return delta // base.stride(0)
        table = self._on("t", timestep.device, lambda: self._t_table)
        match = table == timestep.reshape(()).to(torch.int64)
        # Raises on the device (asynchronously) rather than reading the tensor on the host.
        torch._assert_async(match.any(), "scheduler step: timestep is not in the schedule set by set_timesteps")
        return match.to(torch.int64).argmax()

    # ------------------------------------------------------------------------------------------ step
    def _run_step(self, i, model_output, sample, generator, noise, model_output_uncond, guidance_scale,
                  return_dict, eta: float = 0.0, use_clipped_model_output: bool = False):
        name = f"{type(self).__name__}.step"
        _ops.check_step_inputs(name, sample, model_output, model_output_uncond)
        g = _checks.real_number(name, "guidance_scale", guidance_scale)
        if noise is not None and generator is not None:
            raise ValueError(f"{name}: pass noise or generator, not both")
        if noise is not None:
            _checks.tensor(name, "noise", noise, dtypes=_checks.FLOAT_DTYPES)
            _checks.same_device(name, "sample", sample, noise=noise)
            _checks.same_shape(name, "sample", sample, noise=noise)
        else:
            _checks.generator(name, generator, sample.device)
        key = (eta, use_clipped_model_output)
        # Whether this step adds noise is known on the host, except for a timestep matched on the
        # device: then a seed is drawn and the kernel skips the draw where sigma is 0.
        stochastic = not isinstance(i, int) or self._host_sigma(key)[i] != 0.0
        coefs = self._on(("coefs", key), sample.device, lambda: self._coef_table(*key))[i]
        seed = None
        if stochastic and noise is None:
            seed = _checks.draw_seed(generator, sample.device)
        elif stochastic:
            noise = noise.float().contiguous()
        # Arguments are checked above: straight to the op's dispatcher (its reference under backend "reference").
        prev = _ops.run_step(sample, model_output, model_output_uncond, g, coefs, noise if stochastic else None,
                             seed)
        return SchedulerOutput(prev) if return_dict else (prev,)

    def _host_sigma(self, key) -> list[float]:
        # Python floats, not an array: torch.compile treats arrays as tensors and would see a
        # data-dependent branch where there is none.
        if ("sigma", key) not in self._cache:
            self._cache[("sigma", key)] = self._coef_table(*key)[:, _ops.SIGMA].tolist()
        return self._cache[("sigma", key)]

    def _x0_coefs(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x0 = ax * x + am * m for each prediction type (float64, from float32 alphas)."""
        b = 1.0 - a
        kind = self.config["prediction_type"]
        if kind == "epsilon":  # x0 = (x - sqrt(1 - a) * eps) / sqrt(a)
            return 1.0 / np.sqrt(a), -np.sqrt(b) / np.sqrt(a)
        if kind == "sample":
            return np.zeros_like(a), np.ones_like(a)
        return np.sqrt(a), -np.sqrt(b)  # v_prediction: x0 = sqrt(a) * x - sqrt(1 - a) * v

    def _clip_range(self) -> tuple[float, float]:
        r = float(self.config["clip_sample_range"])
        return (-r, r) if self.config["clip_sample"] else (-math.inf, math.inf)

    def _table(self, columns: dict[int, np.ndarray]) -> torch.Tensor:
        table = np.zeros((len(self._steps), _ops.NUM_COEFS), dtype=np.float64)
        table[:, _ops.CLIP_LO], table[:, _ops.CLIP_HI] = self._clip_range()
        for index, column in columns.items():
            table[:, index] = column
        return torch.from_numpy(table).to(torch.float32)

    # ------------------------------------------------------------------------------------------ other API
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """DDPM and DDIM feed the model the sample unscaled (the method exists for interchangeability)."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The forward process q(x_t | x_0): ``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` per batch element.

        ``timesteps``: an int, or an integer tensor of one value or one per batch element (dim 0).
        Computed in float32, returned in ``original_samples``' dtype.
        """
        name = f"{type(self).__name__}.add_noise"
        _checks.tensor(name, "original_samples", original_samples, dtypes=_checks.FLOAT_DTYPES)
        _checks.tensor(name, "noise", noise, dtypes=_checks.FLOAT_DTYPES)
        _checks.same_shape(name, "original_samples", original_samples, noise=noise)
        _checks.same_device(name, "original_samples", original_samples, noise=noise)
        T = self.config["num_train_timesteps"]
        if isinstance(timesteps, bool) or not isinstance(timesteps, (int, np.integer, torch.Tensor)):
            raise TypeError(f"{name}: timesteps must be an int or an integer tensor, got {type(timesteps).__name__}")
        timesteps = torch.as_tensor(timesteps)
        if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
            raise TypeError(f"{name}: timesteps must be integers, got {timesteps.dtype}")
        if timesteps.device.type == "cpu" and timesteps.numel() and not (0 <= timesteps.min() <= timesteps.max() < T):
            raise ValueError(f"{name}: timesteps must lie in [0, {T}), got {timesteps.tolist()}")
        timesteps = timesteps.to(original_samples.device).flatten()
        if timesteps.numel() not in (1, original_samples.shape[0] if original_samples.dim() else 1):
            raise ValueError(f"{name}: timesteps must hold 1 or batch-size values, got {timesteps.numel()}")
        a = self._on("alphas_cumprod", original_samples.device, lambda: self.alphas_cumprod)[timesteps]
        a = a.reshape(-1, *([1] * max(original_samples.dim() - 1, 0)))
        noisy = a.sqrt() * original_samples.float() + (1 - a).sqrt() * noise.float()
        return noisy.reshape(original_samples.shape).to(original_samples.dtype)


class DDPMScheduler(_Scheduler):
    """Denoising diffusion probabilistic models (Ho et al. 2020), ancestral sampling.

    Options as diffusers' DDPMScheduler. ``variance_type``: fixed_small (default), fixed_small_log
    (the same standard deviation) or fixed_large; the learned ones need the model's variance output
    and fixed_large_log is NaN in diffusers' step, so those raise ValueError.
    """

    _foreign_options = _Scheduler._foreign_options | {"set_alpha_to_one"}
    VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, variance_type: str = "fixed_small",
                 clip_sample: bool = True, prediction_type: str = "epsilon", thresholding: bool = False,
                 dynamic_thresholding_ratio: float = 0.995, clip_sample_range: float = 1.0,
                 sample_max_value: float = 1.0, timestep_spacing: str = "leading", steps_offset: int = 0,
                 rescale_betas_zero_snr: bool = False):
        if variance_type not in self.VARIANCE_TYPES:
            raise ValueError(f"DDPMScheduler: variance_type must be one of {', '.join(self.VARIANCE_TYPES)}, "
                             f"got {variance_type!r}")
        self._configure(dict(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, variance_type=variance_type,
            clip_sample=clip_sample, prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr))
        self.variance_type = variance_type
        # Like diffusers, a DDPM scheduler can step the full training chain before set_timesteps.
        self._build(np.arange(0, num_train_timesteps)[::-1].copy(), None)

    def _final_alpha_cumprod(self) -> torch.Tensor:
        return torch.tensor(1.0)

    def _previous_timesteps(self, steps: np.ndarray) -> list[int]:
        return [int(t) for t in steps[1:]] + [-1]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None, *,
             model_output_uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
             return_dict: bool = True):
        """x_{t-1} from x_t (``sample``) and the model's prediction, as one fused kernel.

        ``timestep``: an int or one-element tensor from ``timesteps``. Noise (none at t = 0): ``noise``
        if given, else drawn from genfast's Philox stream seeded from ``generator``.
        """
        i = self._step_index(timestep, sample.device)
        return self._run_step(i, model_output, sample, generator, noise, model_output_uncond, guidance_scale,
                              return_dict)

    def _coef_table(self, eta: float, use_clipped_model_output: bool) -> torch.Tensor:
        a = self._alpha_t.double().numpy()
        ap = self._alpha_prev.double().numpy()
        b, bp = 1.0 - a, 1.0 - ap
        current_beta = 1.0 - a / ap
        variance = np.maximum(bp / b * current_beta, 1e-20)
        sigma = np.sqrt(current_beta) if self.variance_type == "fixed_large" else np.sqrt(variance)
        sigma = np.where(self._t_table.numpy() > 0, sigma, 0.0)  # no noise is added at t = 0
        ax, am = self._x0_coefs(a)
        return self._table({_ops.AX: ax, _ops.AM: am, _ops.P0: np.sqrt(ap) * current_beta / b,
                            _ops.PX: np.sqrt(a / ap) * bp / b, _ops.SIGMA: sigma})


class DDIMScheduler(_Scheduler):
    """Denoising diffusion implicit models (Song et al. 2021): eta = 0 is deterministic.

    Options as diffusers' DDIMScheduler. As in diffusers, the previous timestep of ``t`` is
    ``t - num_train_timesteps // num_inference_steps`` whatever the spacing.
    """

    _foreign_options = _Scheduler._foreign_options | {"variance_type"}

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, clip_sample: bool = True,
                 set_alpha_to_one: bool = True, steps_offset: int = 0, prediction_type: str = "epsilon",
                 thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 clip_sample_range: float = 1.0, sample_max_value: float = 1.0, timestep_spacing: str = "leading",
                 rescale_betas_zero_snr: bool = False):
        self._configure(dict(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset, prediction_type=prediction_type,
            thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range, sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing, rescale_betas_zero_snr=rescale_betas_zero_snr))
        # The alpha "before" the last step: exactly 1 (a clean sample) or the first alpha_bar.
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

    def _final_alpha_cumprod(self) -> torch.Tensor:
        return self.final_alpha_cumprod

    def _previous_timesteps(self, steps: np.ndarray) -> list[int]:
        stride = self.config["num_train_timesteps"] // self.num_inference_steps
        return [int(t) - stride for t in steps]

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: torch.Generator | None = None, noise: torch.Tensor | None = None, *, eta: float = 0.0,
             use_clipped_model_output: bool = False, model_output_uncond: torch.Tensor | None = None,
             guidance_scale: float = 1.0, return_dict: bool = True):
        """x_{t-1} from x_t (``sample``) and the model's prediction, as one fused kernel.

        ``eta``: 0 is deterministic DDIM, 1 the DDPM-like stochastic step; noise as in DDPMScheduler.step.
        """
        i = self._step_index(timestep, sample.device)
        eta = _checks.real_number("DDIMScheduler.step", "eta", eta)
        if eta < 0:
            raise ValueError(f"DDIMScheduler.step: eta must be >= 0, got {eta}")
        return self._run_step(i, model_output, sample, generator, noise, model_output_uncond, guidance_scale,
                              return_dict, eta, bool(use_clipped_model_output))

    def _coef_table(self, eta: float, use_clipped_model_output: bool) -> torch.Tensor:
        a = self._alpha_t.double().numpy()
        ap = self._alpha_prev.double().numpy()
        b = 1.0 - a
        std = eta * np.sqrt((1.0 - ap) / b * (1.0 - a / ap))
        ax, am = self._x0_coefs(a)
        kind = self.config["prediction_type"]
        zeros, ones = np.zeros_like(a), np.ones_like(a)
        e0 = zeros
        if use_clipped_model_output:  # eps re-derived from the clipped x0, as in GLIDE
            ex, em, e0 = 1.0 / np.sqrt(b), zeros, -np.sqrt(a) / np.sqrt(b)
        elif kind == "epsilon":
            ex, em = zeros, ones
        elif kind == "sample":  # from the unclipped x0 (the model output itself)
            ex, em = 1.0 / np.sqrt(b), -np.sqrt(a) / np.sqrt(b)
        else:  # v_prediction
            ex, em = np.sqrt(b), np.sqrt(a)
        return self._table({_ops.AX: ax, _ops.AM: am, _ops.EX: ex, _ops.EM: em, _ops.E0: e0, _ops.P0: np.sqrt(ap),
                            _ops.PE: np.sqrt(1.0 - ap - std**2), _ops.SIGMA: std if eta > 0 else zeros})
