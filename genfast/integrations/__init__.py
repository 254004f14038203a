"""Doors into the stacks people already use, each importing its library only when it is used.

- ``genfast.integrations.transformers``: ``register()`` makes ``attn_implementation="genfast"`` run every
  attention of a transformers model through ``genfast.ops.attention``; ``GenfastLogitsProcessor`` does
  ``generate``'s sampling filters in one ``genfast.ops.filter_logits`` call.
- ``genfast.integrations.diffusers``: ``GenfastAttnProcessor`` for diffusers' ``Attention`` modules and
  ``set_attn_processor(model, processor)`` for models that have no ``set_attn_processor`` of their own.

This package imports neither library: ``import genfast`` (and ``import genfast.integrations``) stays light.
"""

_DOORS = ("transformers", "diffusers")


def __getattr__(name: str):
    """``genfast.integrations.transformers`` / ``.diffusers`` as attributes, imported on first use (each module
    imports its library only when one of its functions runs)."""
    if name in _DOORS:
        import importlib

        return importlib.import_module(f"genfast.integrations.{name}")
    raise AttributeError(f"module 'genfast.integrations' has no attribute {name!r}")


__all__ = list(_DOORS)
