"""genfast's models: one readable file each, every attention and sampling call through genfast's ops."""

from genfast.models.gpt import GPT, GPTConfig  # noqa: F401
