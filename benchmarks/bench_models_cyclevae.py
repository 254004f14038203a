"""Benchmarks of whole models on genfast's transposed convolution: the CycleGAN generator and the VAE decoder.

Inference (eval mode, torch.no_grad()); images/s = batch / (median ms / 1000). Providers:
- ``genfast-<backend>``: genfast's model run with that kernel backend (not Triton's interpreter), and
  ``genfast-auto`` (what a user gets by default; on a CPU that is the reference path);
- ``reference``: genfast's model under genfast.backend("reference") (conv_transpose2d_ref: torch's convolution in
  fp32 plus the epilogue);
- ``torch-eager``: the same network and weights with torch's own modules (nn.ConvTranspose2d, then the norm and
  activation modules), cuDNN on a GPU; ``torch-compile``: torch.compile of it (CUDA only).
Cases: the CycleGAN ResNet generator of the paper (ngf 64, 9 residual blocks) at 256x256 on a GPU (at 64x64 on a
CPU, where 256x256 takes seconds per image), whose two upsampling blocks are genfast's (InstanceNorm runs after the
kernel); the VAE decoder (latent 128 -> 3x64x64; three ConvTranspose + BatchNorm + LeakyReLU blocks folded into the
kernel's epilogue, then ConvTranspose + tanh).
FLOPs: 2 * multiply-adds of every convolution and transposed convolution and linear layer, forward only (norms and
activations not counted), traced on the meta device.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import genfast
from benchmarks.harness import BenchCase, ReplacedCase, genfast_providers
from genfast.models.cyclegan import CycleGANConfig, ResnetGenerator
from genfast.models.vae import VAE, VAEConfig
from genfast.nn import ConvTranspose2dNormAct

FAMILY = "models_cyclevae"
OP = "conv_transpose2d"  # the genfast op these models depend on, for the backends that serve them


def torch_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every genfast ConvTranspose2dNormAct rebuilt from torch's own modules (same
    state_dict keys, so the weights load as they are)."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if not isinstance(module, ConvTranspose2dNormAct):
            continue
        conv = module.conv
        plain = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                   conv.output_padding, conv.groups, conv.bias is not None, conv.dilation)
        plain.load_state_dict(conv.state_dict())
        replacement = nn.Sequential(plain, *list(module)[1:]).to(conv.weight.device, conv.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent_name) if parent_name else twin, child, replacement)
    return twin


def model_flops(fn, x_shape) -> float:
    """2 * multiply-adds of the convolutions, transposed convolutions and linear layers of ``fn`` (a module)."""
    total = 0.0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Linear):
            total += 2.0 * output.numel() * module.in_features
        elif isinstance(module, nn.Conv2d):
            total += 2.0 * output.numel() * module.weight[0].numel()
        else:  # transposed convolution: the multiply-adds of the convolution it is the gradient of
            n, c_in, h, w = inputs[0].shape
            total += 2.0 * n * c_in * module.out_channels // module.groups * module.weight[0, 0].numel() * h * w

    # Traced on torch's twin: ConvTranspose2dNormAct calls the op with its conv's weights, not the conv module, so
    # hooks on genfast's blocks would not fire.
    meta = torch_twin(fn).to("meta")
    kinds = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
    handles = [m.register_forward_hook(hook) for m in meta.modules() if isinstance(m, kinds)]
    with torch.no_grad(), genfast.backend("reference"):
        meta(torch.empty(x_shape, device="meta"))
    for h in handles:
        h.remove()
    return total


class _Decoder(nn.Module):
    """VAE.decode as a module (latent [N, L] -> images), so the providers share one calling convention."""

    def __init__(self, vae: VAE):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


def _randomize_norms(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model


def _cases(op: str, label: str, model: nn.Module, x_shape, dtype, device) -> list[BenchCase]:
    model = model.to(device=device, dtype=dtype).eval()
    work = model_flops(model, x_shape)
    providers: dict[str, tuple[str | None, nn.Module]] = {}
    for name in genfast_providers(OP, device) + ["auto"]:
        providers[f"genfast-{name}"] = (name, model)
    providers["reference"] = ("reference", model)
    twin = torch_twin(model).eval()
    providers["torch-eager"] = (None, twin)
    if device.type == "cuda":
        providers["torch-compile"] = (None, torch.compile(twin))
    out = []
    for provider, (backend, fn) in providers.items():
        def setup(fn=fn, backend=backend):
            x = torch.randn(x_shape, device=device, dtype=dtype)

            def call():
                with genfast.backend(backend or "auto"), torch.no_grad():
                    return fn(x)
            return call
        out.append(BenchCase(FAMILY, op, label, provider, setup, flops=work))
    return out


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    if device.type == "cuda":
        dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
        size, gen_batches, dec_batches = (64, [1], [16]) if quick else (256, [1, 8], [256])
    else:
        dtypes = [torch.float32]
        size, gen_batches, dec_batches = (32, [1], [8]) if quick else (64, [2], [64])
    torch.manual_seed(0)
    generator = ResnetGenerator(CycleGANConfig())  # ngf 64, 9 residual blocks: the paper's 256x256 generator
    decoder = _Decoder(_randomize_norms(VAE(VAEConfig(image_size=64, channels=3, latent_dim=128,
                                                      base_channels=64))))
    out = []
    for dtype in dtypes:
        dt = str(dtype).replace("torch.", "")
        for batch in gen_batches:
            out += _cases("cyclegan generator", f"{dt} B{batch} {size}x{size}", copy.deepcopy(generator),
                          (batch, 3, size, size), dtype, device)
        for batch in dec_batches:
            out += _cases("vae decode", f"{dt} B{batch} 3x64x64 latent128", copy.deepcopy(decoder), (batch, 128),
                          dtype, device)
    return out


def replaced(device: torch.device, quick: bool = False) -> list[ReplacedCase]:
    """``genfast.fuse`` of each model's plain-torch twin against the twin itself (eval, no grad), at the suite's
    sizes and one larger size each."""
    if device.type == "cuda":
        sizes, batches = [256], [256]
    else:
        sizes, batches = ([32], [8]) if quick else ([64, 128], [64, 128])
    torch.manual_seed(0)
    models = [("cyclegan generator", ResnetGenerator(CycleGANConfig()), [(1, 3, s, s) for s in sizes]),
              ("vae decode", _Decoder(_randomize_norms(VAE(VAEConfig(image_size=64, channels=3, latent_dim=128,
                                                                     base_channels=64)))),
               [(b, 128) for b in batches])]
    out = []
    for name, model, shapes in models:
        for shape in shapes:
            def setup(model=model, shape=shape):
                twin = torch_twin(model).to(device).eval()
                fused, _ = genfast.fuse(twin, inplace=False)
                x = torch.randn(shape, device=device)

                def run(m):
                    def call():
                        with torch.no_grad():
                            return m(x)
                    return call
                return run(fused), run(twin)
            out.append(ReplacedCase(FAMILY, f"genfast.fuse({name})", f"float32 {'x'.join(map(str, shape))} eval",
                                    "the same model in torch modules", setup))
    return out
