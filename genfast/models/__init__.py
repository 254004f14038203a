"""genfast's models: one readable file per model, built on genfast's fused ops."""

from genfast.models.unet import UNet, UNetConfig  # noqa: F401
