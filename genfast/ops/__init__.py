"""genfast's public ops. Each validates its arguments, then runs on the backend in force."""

from genfast.ops.diffusion import cfg_combine, cfg_combine_ref, scheduler_step, scheduler_step_ref
from genfast.ops.random import philox_noise, philox_noise_ref

__all__ = ["philox_noise", "philox_noise_ref", "scheduler_step", "scheduler_step_ref", "cfg_combine",
           "cfg_combine_ref"]
