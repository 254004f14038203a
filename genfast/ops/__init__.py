"""genfast's public ops. Each validates its arguments, then runs on the backend in force."""

from genfast.ops.random import philox_noise, philox_noise_ref
from genfast.ops.sampling import filter_logits, filter_logits_ref, sample_tokens, sample_tokens_ref

__all__ = [
    "filter_logits", "filter_logits_ref", "philox_noise", "philox_noise_ref", "sample_tokens", "sample_tokens_ref",
]
