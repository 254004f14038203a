"""genfast's public ops. Each validates its arguments, then runs on the backend in force."""

from genfast.ops.random import philox_noise, philox_noise_ref

__all__ = ["philox_noise", "philox_noise_ref"]
