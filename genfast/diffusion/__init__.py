"""Diffusion samplers whose steps run as single fused kernels (genfast.ops.scheduler_step)."""

from genfast.diffusion.schedulers import DDIMScheduler, DDPMScheduler, SchedulerOutput

__all__ = ["DDIMScheduler", "DDPMScheduler", "SchedulerOutput"]
from genfast.diffusion.pipeline import DiffusionPipeline, make_scheduler  # noqa: E402

__all__ += ["DiffusionPipeline", "make_scheduler"]
