"""genfast's models: one readable file each, a dataclass config, all attention, convolution and sampling through
genfast ops."""

from genfast.models import cgan, cyclegan, dcgan, numbergan, vae  # noqa: F401
from genfast.models.gpt import GPT, GPTConfig  # noqa: F401
from genfast.models.transformer import Transformer, TransformerConfig  # noqa: F401
from genfast.models.unet import UNet, UNetConfig  # noqa: F401
