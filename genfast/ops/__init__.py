"""genfast's public ops. Each validates its arguments, then runs on the backend in force."""

from genfast.ops.attention import attention, attention_ref
from genfast.ops.attention_decode import attention_decode, attention_decode_ref, kv_cache_append, kv_cache_append_ref
from genfast.ops.attention_varlen import attention_varlen, attention_varlen_ref
from genfast.ops.conv_transpose import conv_transpose1d, conv_transpose2d, conv_transpose2d_ref
from genfast.ops.diffusion import cfg_combine, cfg_combine_ref, scheduler_step, scheduler_step_ref
from genfast.ops.latent import (
    gaussian_kl,
    gaussian_kl_ref,
    langevin_step,
    langevin_step_ref,
    reparameterize,
    reparameterize_ref,
)
from genfast.ops.lstm import lstm_cell, lstm_cell_ref
from genfast.ops.random import philox_noise, philox_noise_ref
from genfast.ops.sampling import filter_logits, filter_logits_ref, sample_tokens, sample_tokens_ref
from genfast.ops.sdpa import scaled_dot_product_attention

__all__ = [
    "attention", "attention_ref", "scaled_dot_product_attention",
    "attention_decode", "attention_decode_ref", "kv_cache_append", "kv_cache_append_ref",
    "philox_noise", "philox_noise_ref",
    "conv_transpose2d", "conv_transpose2d_ref", "conv_transpose1d",
    "filter_logits", "filter_logits_ref", "sample_tokens", "sample_tokens_ref",
    "scheduler_step", "scheduler_step_ref", "cfg_combine", "cfg_combine_ref",
    "reparameterize", "reparameterize_ref", "gaussian_kl", "gaussian_kl_ref", "langevin_step", "langevin_step_ref",
    "attention_varlen", "attention_varlen_ref",
    "lstm_cell", "lstm_cell_ref",
]
