"""genfast's drop-in modules, and fuse() which swaps them into an existing model."""

from genfast.nn.attention import CausalSelfAttention, KVCache, MultiheadAttention
from genfast.nn.conv_transpose import ConvTranspose2d, ConvTranspose2dNormAct
from genfast.nn.fuse import REWRITES, FuseReport, fuse, register_rewrite

__all__ = ["MultiheadAttention", "CausalSelfAttention", "KVCache", "ConvTranspose2d", "ConvTranspose2dNormAct", "fuse",
           "FuseReport", "REWRITES", "register_rewrite"]
