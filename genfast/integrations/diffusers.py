"""genfast inside Hugging Face diffusers: an attention processor for ``diffusers.models.attention_processor.Attention``.

::

    from genfast.integrations.diffusers import GenfastAttnProcessor, set_attn_processor
    unet.set_attn_processor(GenfastAttnProcessor())             # UNet2DConditionModel and other AttentionMixin models
    set_attn_processor(unet, GenfastAttnProcessor())            # any model, e.g. UNet2DModel (no such method)

The processor does what diffusers' default ``AttnProcessor2_0`` does around the attention (spatial norm, group
norm, cross-attention with ``norm_cross``, q/k norms, the output projection and its dropout, the residual
connection, ``rescale_output_factor``, attention masks), and runs the attention itself through
``genfast.ops.attention`` with the module's ``scale`` (``AttnProcessor2_0`` ignores ``attn.scale``; the two agree
unless a model sets ``scale_qk=False``, where this follows diffusers' math processor ``AttnProcessor``). What it
cannot serve raises: added K/V projections (``AttnAddedKVProcessor`` models) and the legacy ``scale`` argument.

diffusers' newer attention-backend dispatcher (``diffusers.models.attention_dispatch``) is not used: its backends
are the members of a closed enum (``AttentionBackendName``) kept in a private registry, so adding "genfast" there
means patching both, and the models that the processor API serves (the UNets) do not go through it anyway.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention

import genfast.ops


class GenfastAttnProcessor:
    """Attention processor for diffusers' ``Attention`` modules that runs genfast's fused attention."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args,
                 **kwargs) -> torch.Tensor:
        if args or kwargs.get("scale") is not None:
            raise TypeError("GenfastAttnProcessor: the legacy `scale` argument is not supported; pass LoRA scales "
                            "through the pipeline's cross_attention_kwargs instead")
        if getattr(attn, "added_kv_proj_dim", None) is not None:
            raise NotImplementedError("GenfastAttnProcessor: Attention modules with added K/V projections "
                                      "(added_kv_proj_dim) need diffusers' AttnAddedKVProcessor; not supported")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:  # image features (B, C, H, W) attend over their H*W positions
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, key_len, _ = context.shape

        if attention_mask is not None:
            # diffusers' additive mask, repeated per head: (B * heads, 1 or Nq, Nk) -> (B, heads, 1 or Nq, Nk).
            attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, Nq, D)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, Nk, D)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            attention_mask = attention_mask.to(query.dtype)

        hidden_states = genfast.ops.attention(query, key, value, attn_mask=attention_mask, scale=attn.scale)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # output projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def set_attn_processor(model: torch.nn.Module, processor) -> int:
    """Give every diffusers ``Attention`` inside ``model`` this processor; returns how many were set.

    For models without ``set_attn_processor`` of their own (UNet2DModel, VAEs); on those that have it, it does the
    same as that method. Raises ValueError when ``model`` holds no Attention module, so a no-op cannot pass unseen.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"set_attn_processor: model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(processor):
        raise TypeError(f"set_attn_processor: processor must be callable, got {type(processor).__name__}")
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    if not modules:
        raise ValueError(f"set_attn_processor: {type(model).__name__} holds no diffusers Attention module")
    for module in modules:
        module.set_processor(processor)
    return len(modules)


__all__ = ["GenfastAttnProcessor", "set_attn_processor"]
