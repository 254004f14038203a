"""genfast's models: one readable file each, a dataclass config, all attention and sampling through genfast ops."""

from genfast.models.transformer import Transformer, TransformerConfig  # noqa: F401
