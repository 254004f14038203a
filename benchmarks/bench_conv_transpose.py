"""Benchmarks of the fused transposed convolution: single decoder layers and whole generators.

Each case is a block ConvTranspose2d -> norm -> activation as models have it, in eval mode (BatchNorm's running
statistics, so genfast folds it into the kernel's epilogue) unless named "train". Providers:
- ``genfast-<backend>``: each genfast kernel backend that serves the op here (not Triton's interpreter), and
  ``genfast-auto`` (what a user gets by default; on a CPU that is the reference path);
- ``reference``: conv_transpose2d_ref (torch's conv in fp32 plus the folded epilogue);
- ``torch-eager``: the nn.Sequential(nn.ConvTranspose2d, nn.BatchNorm2d/InstanceNorm2d, activation) itself
  (cuDNN on a GPU); ``torch-compile``: torch.compile of that same block (CUDA only).
Every case runs the default call: NCHW input, as the models in genfast hold it. On a GPU the whole generators
run again with the fast option, a channels_last input (case suffix "channels_last"; the torch peers get the same
input and channels_last weights, so the comparison stays like for like): genfast's kernel then reads x without
its one NCHW -> channels_last copy and stores vectors of channels. genfast writes its output in x's layout, and a
1x1 latent is in both layouts at once, so in the DCGAN generator genfast stays NCHW where torch, which also looks
at the weight's layout, switches to channels_last: these rows measure what a user passing channels_last gets.
The targets are read from the generator rows: DCGAN generator eval
genfast-auto >= 1.5x torch-eager and >= 1.1x torch-compile; the training step >= 1.2x torch-eager.
FLOPs: 2 * N * C_in * (C_out / groups) * KH * KW * H_in * W_in per transposed convolution (the multiply-adds of
the convolution it is the gradient of), forward only; x3 for forward plus backward. Norm and activation are not
counted. Inference cases run under torch.no_grad().
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import genfast
from benchmarks.harness import BenchCase, genfast_providers
from genfast.nn.conv_transpose import activation_name, fold_norm, uses_running_stats
from genfast.ops import conv_transpose2d_ref

FAMILY = "conv_transpose"
OP = "conv_transpose2d"


def _block(c_in, c_out, k, s, p, op=0, norm="batch", act="relu") -> nn.Sequential:
    layers: list[nn.Module] = [nn.ConvTranspose2d(c_in, c_out, k, s, p, output_padding=op, bias=norm is None)]
    if norm == "batch":
        layers.append(nn.BatchNorm2d(c_out))
    elif norm == "instance":
        layers.append(nn.InstanceNorm2d(c_out))
    layers.append({"relu": nn.ReLU(), "tanh": nn.Tanh(), "leaky_relu": nn.LeakyReLU(0.2)}[act])
    return nn.Sequential(*layers)


def _randomize(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.num_features, generator=gen)
            m.bias.data = 0.1 * torch.randn(m.num_features, generator=gen)
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model


def dcgan_generator(nz=100, ngf=64, nc=3) -> nn.Sequential:
    """The DCGAN generator (Radford et al.): 1x1 latent -> 64x64 image."""
    return nn.Sequential(*_block(nz, ngf * 8, 4, 1, 0), *_block(ngf * 8, ngf * 4, 4, 2, 1),
                         *_block(ngf * 4, ngf * 2, 4, 2, 1), *_block(ngf * 2, ngf, 4, 2, 1),
                         *_block(ngf, nc, 4, 2, 1, norm=None, act="tanh"))


def vae_decoder() -> nn.Sequential:
    """A convolutional VAE decoder: 256 x 4 x 4 features -> 3 x 64 x 64."""
    return nn.Sequential(*_block(256, 128, 4, 2, 1, act="leaky_relu"), *_block(128, 64, 4, 2, 1, act="leaky_relu"),
                         *_block(64, 32, 4, 2, 1, act="leaky_relu"), *_block(32, 3, 4, 2, 1, norm=None, act="tanh"))


def flops(model: nn.Module, x_shape) -> float:
    """Transposed-convolution FLOPs of one forward of ``model`` on ``x_shape`` (shapes traced on the meta device)."""
    total = 0.0

    def hook(module, inputs, output):
        nonlocal total
        n, c_in, h, w = inputs[0].shape
        total += 2.0 * n * c_in * module.out_channels // module.groups * module.weight[0, 0].numel() * h * w

    meta = copy.deepcopy(model).to("meta")
    handles = [m.register_forward_hook(hook) for m in meta.modules() if isinstance(m, nn.ConvTranspose2d)]
    with torch.no_grad():
        meta(torch.empty(x_shape, device="meta"))
    for h in handles:
        h.remove()
    return total


def _reference_of(model: nn.Sequential):
    """The model's blocks as conv_transpose2d_ref calls (running-stat norms folded into scale/shift; instance
    norms applied after the reference convolution, as genfast does)."""
    calls, layers, i = [], list(model), 0
    while i < len(layers):
        conv, norm, act = layers[i], None, None
        i += 1
        if i < len(layers) and isinstance(layers[i], nn.modules.batchnorm._NormBase):
            norm, i = layers[i], i + 1
        act, i = layers[i], i + 1
        calls.append((conv, norm, act))

    def run(x):
        for conv, norm, act in calls:
            conv_args = (conv.weight, conv.bias, conv.stride, conv.padding, conv.output_padding)
            if norm is not None and not uses_running_stats(norm):
                x = act(norm(conv_transpose2d_ref(x, *conv_args)))
                continue
            scale, shift = fold_norm(norm) if norm is not None else (None, None)
            name, slope = activation_name(act)
            x = conv_transpose2d_ref(x, *conv_args, scale=scale, shift=shift, activation=name, negative_slope=slope)
        return x

    return run


def _providers(model: nn.Module, device: torch.device, train: bool) -> dict:
    """provider -> a model to call (each a separate copy sharing nothing)."""
    out = {}
    for name in genfast_providers(OP, device) + ["auto"]:
        fused, _ = genfast.fuse(copy.deepcopy(model))
        out[f"genfast-{name}"] = (name, fused)
    if not train:
        out["reference"] = (None, _reference_of(model))
    out["torch-eager"] = (None, copy.deepcopy(model))
    if device.type == "cuda":
        out["torch-compile"] = (None, torch.compile(copy.deepcopy(model)))
    return out


def _cases(op: str, label: str, model: nn.Module, x_shape, dtype, device, train=False,
           channels_last=False) -> list[BenchCase]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = _randomize(model).to(device=device, dtype=dtype, memory_format=fmt).train(train)
    work = flops(model, x_shape) * (3 if train else 1)
    out = []
    if channels_last:
        label += " channels_last"
    for provider, (backend, fn) in _providers(model, device, train).items():
        def setup(fn=fn, backend=backend):
            x = torch.randn(x_shape, device=device, dtype=dtype).to(memory_format=fmt).requires_grad_(train)

            def call():
                with genfast.backend(backend or "auto"):
                    if not train:
                        with torch.no_grad():
                            return fn(x)
                    y = fn(x)
                    y.backward(torch.ones_like(y))
                    return y
            return call
        out.append(BenchCase(FAMILY, op, label, provider, setup, flops=work))
    return out


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    if quick:
        batches, dtypes = [4], [torch.float32]
    elif device.type == "cuda":
        batches, dtypes = [64, 256], [torch.float32, torch.bfloat16]
    else:
        batches, dtypes = [64], [torch.float32]
    out = []
    for dtype in dtypes:
        dt = _dtype_name(dtype)
        for batch in batches:
            gen = dcgan_generator()
            shape, layer = (batch, 100, 1, 1), 0
            blocks = list(gen)
            i = 0
            while i < len(blocks):  # each DCGAN layer as its own block
                n = 3 if i + 2 < len(blocks) and isinstance(blocks[i + 1], nn.BatchNorm2d) else 2
                block = nn.Sequential(*copy.deepcopy(blocks[i:i + n]))
                conv = blocks[i]
                out += _cases("dcgan layer", f"{dt} B{batch} L{layer + 1} {conv.in_channels}->{conv.out_channels} "
                              f"{shape[2]}x{shape[3]}", block, shape, dtype, device)
                h = (shape[2] - 1) * conv.stride[0] - 2 * conv.padding[0] + conv.kernel_size[0]
                shape, layer, i = (batch, conv.out_channels, h, h), layer + 1, i + n
            out += _cases("dcgan generator eval", f"{dt} B{batch}", gen, (batch, 100, 1, 1), dtype, device)
            out += _cases("dcgan generator train fwd+bwd", f"{dt} B{batch}", dcgan_generator(), (batch, 100, 1, 1),
                          dtype, device, train=True)
            out += _cases("vae decoder eval", f"{dt} B{batch}", vae_decoder(), (batch, 256, 4, 4), dtype, device)
            if device.type == "cuda":  # the fast option (see the module docstring)
                out += _cases("dcgan generator eval", f"{dt} B{batch}", dcgan_generator(), (batch, 100, 1, 1), dtype,
                              device, channels_last=True)
                out += _cases("dcgan generator train fwd+bwd", f"{dt} B{batch}", dcgan_generator(),
                              (batch, 100, 1, 1), dtype, device, train=True, channels_last=True)
                out += _cases("vae decoder eval", f"{dt} B{batch}", vae_decoder(), (batch, 256, 4, 4), dtype, device,
                              channels_last=True)
        size = 32 if quick else 64  # CycleGAN at 256x256: the upsampling path starts from 64x64 features
        for c_in, c_out, s in [(256, 128, size), (128, 64, 2 * size)]:
            block = _block(c_in, c_out, 3, 2, 1, op=1, norm="instance")
            out += _cases("cyclegan upsample", f"{dt} B1 {c_in}->{c_out} {s}x{s}", block, (1, c_in, s, s), dtype,
                          device)
    return out
