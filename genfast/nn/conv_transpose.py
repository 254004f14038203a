"""Drop-in transposed-convolution modules on genfast.ops.conv_transpose2d.

- ``ConvTranspose2d``: a subclass of torch.nn.ConvTranspose2d (same arguments, parameters, state_dict), with an
  optional fused ``activation``.
- ``ConvTranspose2dNormAct``: a subclass of nn.Sequential holding (ConvTranspose2d, BatchNorm2d or
  InstanceNorm2d, activation module), so its state_dict is exactly that of
  ``nn.Sequential(nn.ConvTranspose2d, nn.BatchNorm2d, nn.ReLU())`` ("0.weight", "1.running_mean", ...) and loads
  from and into it. Where the norm uses running statistics (eval mode), it is folded into the kernel's
  per-channel scale/shift epilogue together with the activation: one kernel for the whole block. Where it uses
  batch or instance statistics (training, InstanceNorm without running stats), those statistics depend on the
  whole convolution output, so the norm module itself runs after the kernel: behaviour (batch statistics,
  running statistics, momentum, num_batches_tracked) is then nn.BatchNorm2d's / nn.InstanceNorm2d's own.
"""

from __future__ import annotations

import torch
from torch import nn

from genfast import ops
from genfast.ops.conv_transpose import ACTIVATION_TABLE, ACTIVATIONS, activate

# Activation modules genfast fuses, and their names in the op (the op's one table, inverted).
_ACTIVATION_MODULES = {entry.module: name for name, entry in ACTIVATION_TABLE.items()}
NORMS = (None, "batch", "instance")


def activation_name(module: nn.Module) -> tuple[str | None, float] | None:
    """(name, negative_slope) of an activation module genfast can fuse, else None. GELU only in its exact form."""
    name = _ACTIVATION_MODULES.get(type(module))
    if name is None or (name == "gelu" and module.approximate != "none"):
        return None
    return name, float(module.negative_slope) if name == "leaky_relu" else 0.01


def activation_module(name: str | None, negative_slope: float = 0.01) -> nn.Module | None:
    if name is None:
        return None
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    return ACTIVATION_TABLE[name].module()


def _check_activation(activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}, got {activation!r}")


def _output_padding(conv: nn.ConvTranspose2d, x: torch.Tensor, output_size) -> list[int]:
    return conv._output_padding(x, output_size, conv.stride, conv.padding, conv.kernel_size, 2, conv.dilation)


class ConvTranspose2d(nn.ConvTranspose2d):
    """torch.nn.ConvTranspose2d run by genfast's kernel, with an optional fused activation.

    Arguments as torch.nn.ConvTranspose2d, plus keyword-only ``activation`` (one of
    genfast.ops.conv_transpose.ACTIVATIONS: None, "relu", "leaky_relu", ...) and ``negative_slope``.
    Input [N, C_in, H, W] or [C_in, H, W]; forward takes
    torch's optional ``output_size``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, padding_mode: str = "zeros", device=None,
                 dtype=None, *, activation: str | None = None, negative_slope: float = 0.01):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, padding_mode, device, dtype)
        _check_activation(activation)
        self.activation = activation
        self.negative_slope = float(negative_slope)

    @classmethod
    def from_module(cls, conv: nn.ConvTranspose2d, activation: str | None = None,
                    negative_slope: float = 0.01) -> "ConvTranspose2d":
        """A genfast module sharing ``conv``'s parameter objects (no copy: optimizers keep working)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.output_padding, conv.groups, conv.bias is not None, conv.dilation, conv.padding_mode,
                  device="meta", dtype=conv.weight.dtype, activation=activation, negative_slope=negative_slope)
        new.weight, new.bias = conv.weight, conv.bias
        new.train(conv.training)
        return new

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
        return ops.conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding,
                                    _output_padding(self, input, output_size), self.groups, self.dilation,
                                    activation=self.activation, negative_slope=self.negative_slope)

    # A printed model names genfast and what it stands in for, so a genfast.fuse(...) result shows what it replaced.
    def _get_name(self) -> str:
        return "genfast.ConvTranspose2d"

    def extra_repr(self) -> str:
        extra = f", activation={self.activation!r}" if self.activation else ""
        if self.activation == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        return super().extra_repr() + extra + ", drop-in for torch.nn.ConvTranspose2d"


def fold_norm(norm: nn.modules.batchnorm._NormBase) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in fp32 with norm(y) == y * scale + shift per channel, from the running statistics."""
    inv = torch.rsqrt(norm.running_var.float() + norm.eps)
    scale = inv * norm.weight.float() if norm.weight is not None else inv
    shift = -norm.running_mean.float() * scale
    if norm.bias is not None:
        shift = shift + norm.bias.float()
    return scale, shift


def uses_running_stats(norm: nn.Module) -> bool:
    """Whether ``norm`` normalises with its running statistics in its current mode (then it can be folded)."""
    return not norm.training and getattr(norm, "running_mean", None) is not None


class ConvTranspose2dNormAct(nn.Sequential):
    """ConvTranspose2d -> BatchNorm2d / InstanceNorm2d / nothing -> activation, as one genfast block.

    An nn.Sequential of (genfast ConvTranspose2d, norm module if any, activation module if any): state_dict keys
    and loading are nn.Sequential's. ``norm``: "batch", "instance" or None; ``eps``, ``momentum``, ``affine`` and
    ``track_running_stats`` go to the norm (None: that norm's torch default). Eval mode with running statistics
    runs one fused kernel; otherwise see the module docstring.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 groups: int = 1, bias: bool = True, dilation=1, *, norm: str | None = "batch",
                 activation: str | None = "relu", negative_slope: float = 0.01, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool | None = None, track_running_stats: bool | None = None,
                 device=None, dtype=None):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(map(repr, NORMS))}, got {norm!r}")
        _check_activation(activation)
        factory = {"device": device, "dtype": dtype}
        layers: list[nn.Module] = [ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding,
                                                   output_padding, groups, bias, dilation, **factory)]
        if norm is not None:
            cls = nn.BatchNorm2d if norm == "batch" else nn.InstanceNorm2d
            default = norm == "batch"  # BatchNorm2d defaults to affine + running stats, InstanceNorm2d to neither
            layers.append(cls(out_channels, eps, momentum, default if affine is None else affine,
                              default if track_running_stats is None else track_running_stats, **factory))
        act = activation_module(activation, negative_slope)
        if act is not None:
            layers.append(act)
        super().__init__(*layers)

    @classmethod
    def from_modules(cls, conv: nn.ConvTranspose2d, norm: nn.Module | None = None,
                     act: nn.Module | None = None) -> "ConvTranspose2dNormAct":
        """A block around these very modules (parameters and buffers shared, not copied); used by genfast.fuse."""
        block = cls.__new__(cls)
        layers = [conv if isinstance(conv, ConvTranspose2d) else ConvTranspose2d.from_module(conv)]
        layers += [m for m in (norm, act) if m is not None]
        nn.Sequential.__init__(block, *layers)
        block.train(conv.training)
        return block

    def _get_name(self) -> str:
        return "genfast.ConvTranspose2dNormAct"

    def extra_repr(self) -> str:
        parts = " + ".join(type(m).__name__ for m in (self.conv, self.norm, self.act) if m is not None)
        return f"fuses {parts}"

    @property
    def conv(self) -> ConvTranspose2d:
        return self[0]

    # The block stands where genfast.fuse found the convolution, so model code that reads that convolution's
    # parameters through its old index (``self.decoder[0][0].weight``) keeps working.
    @property
    def weight(self) -> nn.Parameter:
        return self[0].weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self[0].bias

    @property
    def norm(self) -> nn.Module | None:
        return next((m for m in self if isinstance(m, nn.modules.batchnorm._NormBase)), None)

    @property
    def act(self) -> nn.Module | None:
        last = self[-1]
        return last if len(self) > 1 and activation_name(last) is not None else None

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        conv, norm, act = self.conv, self.norm, self.act
        name, slope = activation_name(act) if act is not None else (None, 0.01)
        if conv.activation is not None:
            raise ValueError("ConvTranspose2dNormAct: its ConvTranspose2d must not carry an activation of its own")
        args = (input, conv.weight, conv.bias, conv.stride, conv.padding, _output_padding(conv, input, output_size),
                conv.groups, conv.dilation)
        if norm is None or uses_running_stats(norm):
            scale, shift = fold_norm(norm) if norm is not None else (None, None)
            return ops.conv_transpose2d(*args, scale=scale, shift=shift, activation=name, negative_slope=slope)
        # Batch or instance statistics: they need the whole convolution output first, so the norm module runs
        # as itself (exactly torch's statistics and running-stat updates), then the activation.
        return activate(norm(ops.conv_transpose2d(*args)), name, slope)
