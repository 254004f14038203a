"""Sampling from a diffusion UNet: the DDPM / DDIM loop with fused steps, guidance, and CUDA graphs.

    pipe = DiffusionPipeline(unet, DDIMScheduler(prediction_type="epsilon"))
    images = pipe.sample(16, num_inference_steps=50, guidance_scale=3.0, class_labels=labels,
                         generator=torch.Generator().manual_seed(0))          # [16, C, H, W], about [-1, 1]

Each step is one UNet call and one fused scheduler step (genfast.ops.scheduler_step). With classifier-free
guidance (``guidance_scale != 1`` and class labels) the conditional and unconditional predictions come from
one UNet call on a doubled batch, and the guidance ``uncond + g * (cond - uncond)`` — the formula of
genfast.ops.cfg_combine — is fused into the step itself, so no separate pass over the outputs is made. With
``guidance_scale == 1`` the unconditional branch is not run at all: the result is the conditional model's.

``cuda_graph=True`` (CUDA only): one denoising step — UNet, guidance and scheduler step, reading the
timestep, coefficients and noise seed of the current step from device buffers and advancing the step
counter on the device — is captured once into a CUDA graph and replayed ``num_inference_steps`` times. No
step synchronises the host or launches more than one graph. Noise seeds are drawn from ``generator`` before
the replays, in the order the eager loop draws them, so the graph and the eager loop give the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genfast.diffusion.schedulers import DDIMScheduler, DDPMScheduler, _Scheduler
from genfast.ops import _checks
from genfast.ops import diffusion as _ops

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


def _progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr over the sampling steps (tqdm directly: the library does not import genfast.training)."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def make_scheduler(kind: str, **options) -> _Scheduler:
    """A DDPM or DDIM scheduler by name ("ddpm" | "ddim") with diffusers' options; an unknown name or option
    raises ValueError naming it (options another scheduler kind uses, e.g. DDIM's set_alpha_to_one for DDPM,
    are ignored as diffusers does, so one training config serves both)."""
    if kind not in SCHEDULERS:
        raise ValueError(f"make_scheduler: unknown scheduler {kind!r}; known: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[kind].from_config(options)


@dataclass
class _GraphState:
    """The captured step and the static buffers it reads and writes (reused while the key matches)."""

    key: tuple
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor  # float32 [n, C, H, W]: the sample, updated in place by each replay
    index: torch.Tensor  # int64 0-d: the step being run
    timesteps: torch.Tensor  # int64 [steps]
    coefs: torch.Tensor  # float32 [steps, 11]
    seeds: torch.Tensor | None  # int64 [steps, 1]
    labels: torch.Tensor | None  # int64 [n]


class DiffusionPipeline:
    """A UNet (``forward(x, timesteps, class_labels=None)``, ``config.in_channels`` / ``image_size`` /
    ``num_classes`` / ``check_sample_size(size, name)``, as genfast.models.UNetConfig has) with a genfast
    DDPMScheduler or DDIMScheduler."""

    def __init__(self, unet: nn.Module, scheduler: _Scheduler):
        if not isinstance(unet, nn.Module) or not hasattr(unet, "config"):
            raise TypeError(f"DiffusionPipeline: unet must be a genfast UNet (an nn.Module with a config), "
                            f"got {type(unet).__name__}")
        if not isinstance(scheduler, (DDPMScheduler, DDIMScheduler)):
            raise TypeError(f"DiffusionPipeline: scheduler must be a genfast DDPMScheduler or DDIMScheduler, "
                            f"got {type(scheduler).__name__}")
        self.unet = unet
        self.scheduler = scheduler
        self._graph: _GraphState | None = None

    @classmethod
    def from_unet(cls, unet: nn.Module, scheduler: str = "ddim", **scheduler_options) -> "DiffusionPipeline":
        """A pipeline with a scheduler made by name (see make_scheduler)."""
        return cls(unet, make_scheduler(scheduler, **scheduler_options))

    # ------------------------------------------------------------------------------------------ checks
    def _labels(self, n: int, class_labels, device: torch.device) -> torch.Tensor | None:
        num_classes = self.unet.config.num_classes
        if class_labels is None:
            return None
        if not num_classes:
            raise ValueError("DiffusionPipeline.sample: class_labels given but the UNet is unconditional")
        if isinstance(class_labels, int) and not isinstance(class_labels, bool):
            class_labels = [class_labels] * n
        labels = torch.as_tensor(class_labels)
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.shape != (n,):
            raise ValueError(f"DiffusionPipeline.sample: class_labels must be an int or n={n} integers, "
                             f"got {labels.dtype} of shape {tuple(labels.shape)}")
        labels = labels.to(torch.int64)
        if labels.device.type == "cpu" and n and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
            raise ValueError(f"DiffusionPipeline.sample: class_labels must lie in [0, {num_classes}), "
                             f"got {labels.tolist()}")
        return labels.to(device)

    # ------------------------------------------------------------------------------------------ one step
    def _model_outputs(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, guided: bool):
        """(output, unconditional output or None) in float32 for the current sample and 0-d timestep ``t``."""
        dtype = next(self.unet.parameters()).dtype
        n = x.shape[0]
        if guided:
            null = torch.full_like(labels, self.unet.config.num_classes)
            out = self.unet(torch.cat([x, x]).to(dtype), t.expand(2 * n), torch.cat([labels, null])).float()
            return out[:n], out[n:]
        return self.unet(x.to(dtype), t.expand(n), labels).float(), None

    # ------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, n: int, num_inference_steps: int = 50, guidance_scale: float = 1.0, class_labels=None,
               generator: torch.Generator | None = None, eta: float = 0.0, *, image_size: int | None = None,
               progress: bool = False, cuda_graph: bool = False) -> torch.Tensor:
        """Draw ``n`` samples: float32 [n, C, image_size, image_size], nominally in [-1, 1] (not clamped).

        num_inference_steps: scheduler steps. guidance_scale: classifier-free guidance (needs class_labels;
        1 runs the conditional model alone). class_labels: an int or n ints in [0, num_classes). generator:
        the initial noise and every step's noise (on the UNet's device). eta: DDIM's stochasticity (0:
        deterministic); DDPM takes none. image_size: default the UNet's. progress: a tqdm bar.
        cuda_graph: capture one step into a CUDA graph and replay it (CUDA only; see the module docstring).
        """
        op = "DiffusionPipeline.sample"
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{op}: n must be a positive int, got {n!r}")
        g = _checks.real_number(op, "guidance_scale", guidance_scale)
        eta = _checks.real_number(op, "eta", eta)
        if isinstance(self.scheduler, DDPMScheduler) and eta != 0.0:
            raise ValueError(f"{op}: eta applies to DDIM only; the DDPM scheduler takes none (got eta={eta})")
        if eta < 0:
            raise ValueError(f"{op}: eta must be >= 0, got {eta}")
        cfg = self.unet.config
        size = cfg.image_size if image_size is None else image_size
        cfg.check_sample_size(size, "image_size")  # the UNet's own rule, asked of its config (no upward import)
        device = next(self.unet.parameters()).device
        _checks.generator(op, generator, device)
        labels = self._labels(n, class_labels, device)
        if g != 1.0 and labels is None:
            raise ValueError(f"{op}: guidance_scale={g} needs class_labels (and a class-conditional UNet)")
        guided = g != 1.0
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"{op}: cuda_graph=True needs the UNet on a CUDA device, it is on {device}")

        was_training = self.unet.training
        self.unet.eval()
        try:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            x = torch.randn((n, cfg.in_channels, size, size), generator=generator, device=device)
            x = x * self.scheduler.init_noise_sigma
            if cuda_graph:
                return self._sample_graphed(x, labels, g, guided, eta, generator, progress)
            return self._sample_eager(x, labels, g, guided, eta, generator, progress)
        finally:
            self.unet.train(was_training)

    def _step_kwargs(self, eta: float) -> dict:
        return {"eta": eta} if isinstance(self.scheduler, DDIMScheduler) else {}

    def _sample_eager(self, x, labels, g, guided, eta, generator, progress):
        timesteps = self.scheduler.timesteps
        with _progress_bar(len(timesteps), "sampling", progress) as bar:
            for t in timesteps:
                out, uncond = self._model_outputs(x, t, labels, guided)
                x = self.scheduler.step(out, t, x, generator=generator, model_output_uncond=uncond,
                                        guidance_scale=g, **self._step_kwargs(eta)).prev_sample
                bar.update(1)
        return x

    # ------------------------------------------------------------------------------------------ CUDA graph
    def _sample_graphed(self, x, labels, g, guided, eta, generator, progress):
        scheduler = self.scheduler
        key_sigma = (eta, False)
        sigmas = scheduler._host_sigma(key_sigma)  # per step, on the host: which steps add noise
        coefs = scheduler._coef_table(*key_sigma).to(x.device)
        stochastic = any(s != 0.0 for s in sigmas)
        dtype = next(self.unet.parameters()).dtype
        key = (tuple(x.shape), len(sigmas), g, guided, labels is not None, stochastic, dtype, type(scheduler))
        state = self._graph if self._graph is not None and self._graph.key == key else None
        if state is None:
            self._graph = None  # free the old graph's memory before capturing a new one
            state = self._capture(key, x, labels, coefs, stochastic, g, guided)
        # Fill the static buffers: the initial noise, this run's tables and labels, step 0.
        state.x.copy_(x)
        state.timesteps.copy_(scheduler.timesteps)
        state.coefs.copy_(coefs)
        if state.labels is not None:
            state.labels.copy_(labels)
        if state.seeds is not None:
            # The eager loop draws one seed per noisy step, in step order: draw the same, from the same generator.
            state.seeds.zero_()
            for i, sigma in enumerate(sigmas):
                if sigma != 0.0:
                    state.seeds[i].copy_(_checks.draw_seed(generator, x.device))
        state.index.zero_()
        with _progress_bar(len(sigmas), "sampling (CUDA graph)", progress) as bar:
            for _ in range(len(sigmas)):
                state.graph.replay()
                bar.update(1)
        return state.x.clone()

    def _capture(self, key, x, labels, coefs, stochastic, g, guided) -> _GraphState:
        steps = coefs.shape[0]
        device = x.device
        state = _GraphState(
            key=key, graph=torch.cuda.CUDAGraph(), x=x.clone(), index=torch.zeros((), dtype=torch.int64, device=device),
            timesteps=self.scheduler.timesteps.clone(), coefs=coefs.clone(),
            seeds=torch.zeros((steps, 1), dtype=torch.int64, device=device) if stochastic else None,
            labels=labels.clone() if labels is not None else None)

        def step():
            # Everything the step needs is read on the device at state.index: no host value changes per step.
            t = state.timesteps[state.index]
            out, uncond = self._model_outputs(state.x, t, state.labels, guided)
            seed = state.seeds[state.index] if state.seeds is not None else None
            prev = _ops.run_step(state.x, out, uncond, g, state.coefs[state.index], None, seed)
            state.x.copy_(prev)
            state.index.add_(1)

        # Warm up on a side stream (Triton compiles and autotunes, cuBLAS picks its kernels), as torch's
        # CUDA-graph recipe asks, then put the buffers back and capture.
        start = state.x.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        state.x.copy_(start)
        state.index.zero_()
        # Autocast's weight-cast cache would hand the graph tensors freed after capture: capture without it.
        amp = torch.is_autocast_enabled("cuda")
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=amp, cache_enabled=False):
            with torch.cuda.graph(state.graph):
                step()
        return state


__all__ = ["DiffusionPipeline", "make_scheduler", "SCHEDULERS"]
