"""Benchmarks of one DDPM step and one DDIM step: genfast's fused step against the eager step.

Providers: each genfast backend (``scheduler.step`` running the fused op), ``reference`` (the
readable step, ``scheduler.step`` under the reference backend), ``torch-eager`` (the unfused step
as diffusers computes it, written out here with torch ops) and ``diffusers`` (diffusers' own
``step``). "noise inside" cases draw the noise in the step (genfast: Philox in the kernel; eager and
diffusers: torch.randn), "noise given" cases pass it in. bytes = what a step must move: sample and
model output read, noise read when given (float32), output written.

Replaced row (``replaced``): ``genfast.ops.cfg_combine(uncond, cond, g)`` against the eager
``uncond + g * (cond - uncond)``, at the suite's shape and a 4x larger one.
"""

from __future__ import annotations

import torch

from benchmarks.harness import BenchCase, ReplacedCase, genfast_providers, with_backend
from genfast import ops
from genfast.diffusion import DDIMScheduler, DDPMScheduler

FAMILY = "diffusion"
CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
STEPS = 50
STEP_INDEX = 10  # a step in the middle of the chain: noise is added (sigma > 0)


def _eager_ddpm(alphas_cumprod, t, prev_t, model_output, sample, noise=None, generator=None):
    """diffusers' DDPMScheduler.step math (epsilon, fixed_small), op by op in eager torch."""
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t
    x0 = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
    x0_coeff = (alpha_prod_t_prev**0.5 * current_beta_t) / beta_prod_t
    sample_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
    prev = x0_coeff * x0 + sample_coeff * sample
    if noise is None:
        noise = torch.randn(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
    variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
    return prev + variance**0.5 * noise


def _eager_ddim(alphas_cumprod, t, prev_t, model_output, sample):
    """diffusers' DDIMScheduler.step math (epsilon, eta = 0), op by op in eager torch."""
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    beta_prod_t = 1 - alpha_prod_t
    x0 = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
    direction = (1 - alpha_prod_t_prev) ** 0.5 * model_output
    return alpha_prod_t_prev**0.5 * x0 + direction


def _shapes(device: torch.device, quick: bool) -> list[tuple[tuple[int, ...], torch.dtype]]:
    if quick:
        return [((2, 3, 32, 32), torch.float32)]
    if device.type == "cuda":
        return [((64, 4, 64, 64), torch.float16), ((64, 4, 64, 64), torch.float32), ((16, 4, 256, 256), torch.float16)]
    return [((16, 3, 64, 64), torch.float32)]


def _label(kind: str, shape, dtype, noise: str) -> str:
    return f"{kind} {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} noise {noise}"


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    out: list[BenchCase] = []
    backends = genfast_providers("scheduler_step", device)
    try:  # the lent GPU image has no diffusers: there, the torch-eager and diffusers rows (built on it) are left out
        import diffusers
    except ImportError:
        diffusers = None
    for shape, dtype in _shapes(device, quick):
        numel = 1
        for s in shape:
            numel *= s
        size = torch.empty((), dtype=dtype).element_size()
        drawn_bytes = 3 * numel * size  # sample, model_output read; prev written
        given_bytes = drawn_bytes + 4 * numel  # plus float32 noise read

        def tensors(shape=shape, dtype=dtype):
            gen = torch.Generator(device).manual_seed(0)
            x = torch.randn(shape, generator=gen, device=device).to(dtype)
            m = torch.randn(shape, generator=gen, device=device).to(dtype)
            noise = torch.randn(shape, generator=gen, device=device)
            return x, m, noise

        for kind, cls, their_cls in (("ddpm", DDPMScheduler, getattr(diffusers, "DDPMScheduler", None)),
                                     ("ddim", DDIMScheduler, getattr(diffusers, "DDIMScheduler", None))):
            # DDPM always adds noise (drawn inside or given); DDIM with eta = 0 adds none.
            modes = ("inside", "given") if kind == "ddpm" else ("none",)
            for mode in modes:
                label = _label(kind, shape, dtype, mode)
                nbytes = given_bytes if mode == "given" else drawn_bytes

                def ours(backend, cls=cls, mode=mode, tensors=tensors):
                    def setup():
                        scheduler = cls(**CONFIG)
                        scheduler.set_timesteps(STEPS, device=device)
                        t = int(scheduler.timesteps[STEP_INDEX])
                        x, m, noise = tensors()
                        gen = torch.Generator(device).manual_seed(1)
                        kwargs = {"noise": noise} if mode == "given" else {"generator": gen} if mode == "inside" else {}
                        scheduler.step(m, t, x, **kwargs)  # builds the coefficient table once, as a loop would
                        return with_backend(backend, lambda: scheduler.step(m, t, x, **kwargs))
                    return setup

                for backend in backends:
                    out.append(BenchCase(FAMILY, "scheduler_step", label, f"genfast-{backend}", ours(backend),
                                         bytes=nbytes))
                out.append(BenchCase(FAMILY, "scheduler_step", label, "reference", ours("reference"), bytes=nbytes))

                def eager(kind=kind, mode=mode, tensors=tensors, their_cls=their_cls):
                    theirs = their_cls(**CONFIG)
                    theirs.set_timesteps(STEPS)
                    t = int(theirs.timesteps[STEP_INDEX])
                    prev_t = t - theirs.config.num_train_timesteps // STEPS
                    alphas = theirs.alphas_cumprod.to(device)
                    x, m, noise = tensors()
                    x, m = x.float(), m.float()  # the math in float32, as the fused step computes it
                    gen = torch.Generator(device).manual_seed(1)
                    if kind == "ddim":
                        return lambda: _eager_ddim(alphas, t, prev_t, m, x).to(dtype)
                    if mode == "given":
                        return lambda: _eager_ddpm(alphas, t, prev_t, m, x, noise=noise).to(dtype)
                    return lambda: _eager_ddpm(alphas, t, prev_t, m, x, generator=gen).to(dtype)

                if their_cls is None:
                    continue
                out.append(BenchCase(FAMILY, "scheduler_step", label, "torch-eager", eager, bytes=nbytes))

                if mode != "given":  # diffusers' DDPM step cannot take its noise
                    def theirs_step(kind=kind, tensors=tensors, their_cls=their_cls):
                        theirs = their_cls(**CONFIG)
                        theirs.set_timesteps(STEPS, device=device)
                        t = theirs.timesteps[STEP_INDEX]
                        x, m, _ = tensors()
                        gen = torch.Generator(device).manual_seed(1)
                        if kind == "ddim":
                            return lambda: theirs.step(m, t, x, eta=0.0).prev_sample
                        return lambda: theirs.step(m, t, x, generator=gen).prev_sample

                    out.append(BenchCase(FAMILY, "scheduler_step", label, "diffusers", theirs_step, bytes=nbytes))

        # Classifier-free guidance alone.
        label = f"cfg {'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')}"

        def cfg_ours(backend, tensors=tensors):
            def setup():
                u, c, _ = tensors()
                return with_backend(backend, lambda: ops.cfg_combine(u, c, 7.5))
            return setup

        def cfg_eager(tensors=tensors):
            u, c, _ = tensors()
            return lambda: u + 7.5 * (c - u)

        for backend in genfast_providers("cfg_combine", device):
            out.append(BenchCase(FAMILY, "cfg_combine", label, f"genfast-{backend}", cfg_ours(backend),
                                 bytes=drawn_bytes))
        out.append(BenchCase(FAMILY, "cfg_combine", label, "reference", cfg_ours("reference"), bytes=drawn_bytes))
        out.append(BenchCase(FAMILY, "cfg_combine", label, "torch-eager", cfg_eager, bytes=drawn_bytes))
    return out


def replaced(device: torch.device, quick: bool = False) -> list[ReplacedCase]:
    out = []
    for shape, dtype in _shapes(device, quick)[:1]:
        for size in ([shape] if quick else [shape, (*shape[:-2], 2 * shape[-2], 2 * shape[-1])]):
            def setup(size=size, dtype=dtype):
                gen = torch.Generator(device).manual_seed(0)
                u, c = (torch.randn(size, generator=gen, device=device).to(dtype) for _ in range(2))
                return lambda: ops.cfg_combine(u, c, 7.5), lambda: u + 7.5 * (c - u)
            label = f"cfg {'x'.join(map(str, size))} {str(dtype).replace('torch.', '')}"
            out.append(ReplacedCase(FAMILY, "genfast.ops.cfg_combine", label, "uncond + g * (cond - uncond)", setup))
    return out
