"""Benchmarks of the latent-variable ops: reparameterize (forward, forward+backward), gaussian_kl, langevin_step.

Providers: each genfast kernel backend that can serve the op here (not Triton's interpreter), ``reference``
(the ``*_ref`` functions: plain PyTorch, fp32 compute, eps from genfast's Philox stream), ``torch-eager``
(the plain formula in the input's dtype with ``torch.randn_like``) and, on CUDA, ``torch-compile`` of that
formula. ``bytes`` is what the op must read and write once (inputs read, outputs written), the same
yardstick for every provider of a case.
"""

from __future__ import annotations

import math

import torch

import genfast
from benchmarks.harness import BenchCase, genfast_providers
from genfast.ops import _checks
from genfast.ops.latent import gaussian_kl_ref, langevin_step_ref, reparameterize_ref

FAMILY = "latent"
STEP_SIZE = 0.01
NOISE_SCALE = math.sqrt(2 * STEP_SIZE)
CLAMP = (-1.0, 1.0)


def _configs(device: torch.device, quick: bool) -> list[tuple[tuple[int, ...], torch.dtype]]:
    vae = (256, 4, 32, 32)  # a Stable-Diffusion-like latent batch
    if quick:
        return [((16, 4, 16, 16), torch.float32)]
    if device.type == "cuda":
        return [(vae, torch.float32), (vae, torch.bfloat16), ((64, 16, 128, 128), torch.bfloat16)]
    return [(vae, torch.float32)]


def _label(shape, dtype) -> str:
    return f"{str(dtype).replace('torch.', '')} {'x'.join(map(str, shape))}"


def _inputs(shape, dtype, device, requires_grad=False):
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(shape, device=device, generator=gen).to(dtype).requires_grad_(requires_grad)
    b = (0.5 * torch.randn(shape, device=device, generator=gen)).to(dtype).requires_grad_(requires_grad)
    return a, b


# Peers: the formulas as people write them, in the inputs' dtype.
def eager_reparameterize(mu, logvar):
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def eager_kl(mu, logvar):
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=tuple(range(1, mu.dim())))


def eager_langevin(x, grad):
    return (x - STEP_SIZE * grad + NOISE_SCALE * torch.randn_like(x)).clamp(*CLAMP)


def _peers(device: torch.device, eager):
    peers = {"torch-eager": eager}
    if device.type == "cuda":
        peers["torch-compile"] = torch.compile(eager)
    return peers


def _reparameterize_cases(shape, dtype, device) -> list[BenchCase]:
    label, numel, size = _label(shape, dtype), math.prod(shape), torch.finfo(dtype).bits // 8
    out = []

    def forward(fn):
        def setup():
            mu, logvar = _inputs(shape, dtype, device)
            return lambda: fn(mu, logvar)
        return setup

    def forward_backward(fn):
        def setup():
            mu, logvar = _inputs(shape, dtype, device, requires_grad=True)
            dz = torch.randn(shape, device=device).to(dtype)
            return lambda: torch.autograd.grad(fn(mu, logvar), (mu, logvar), dz)
        return setup

    def reference(mu, logvar):
        return reparameterize_ref(mu, logvar, seed=_checks.draw_seed(None, device))

    providers = {f"genfast-{name}": _bound(name, lambda m, lv: genfast.ops.reparameterize(m, lv))
                 for name in genfast_providers("reparameterize", device)}
    providers["reference"] = reference
    providers.update(_peers(device, eager_reparameterize))
    for provider, fn in providers.items():
        # forward: read mu, logvar; write z. backward: read dz, logvar; write dlogvar (dmu is dz itself).
        out.append(BenchCase(FAMILY, "reparameterize", label, provider, forward(fn), bytes=3 * numel * size))
        out.append(BenchCase(FAMILY, "reparameterize fwd+bwd", label, provider, forward_backward(fn),
                             bytes=6 * numel * size))
    return out


def _kl_cases(shape, dtype, device) -> list[BenchCase]:
    label, numel, size = _label(shape, dtype), math.prod(shape), torch.finfo(dtype).bits // 8

    def case(provider, fn):
        def setup():
            mu, logvar = _inputs(shape, dtype, device)
            return lambda: fn(mu, logvar)
        # read mu and logvar; write one float32 per row.
        return BenchCase(FAMILY, "gaussian_kl", label, provider, setup, bytes=2 * numel * size + 4 * shape[0])

    out = []
    for name in genfast_providers("gaussian_kl", device):
        out.append(case(f"genfast-{name}", _bound(name, lambda m, lv: genfast.ops.gaussian_kl(m, lv))))
    out.append(case("reference", gaussian_kl_ref))
    out.extend(case(provider, fn) for provider, fn in _peers(device, eager_kl).items())
    return out


def _langevin_cases(shape, dtype, device) -> list[BenchCase]:
    label, numel, size = _label(shape, dtype), math.prod(shape), torch.finfo(dtype).bits // 8
    label += f" clamp{CLAMP}"

    def case(provider, fn):
        def setup():
            x, grad = _inputs(shape, dtype, device)
            return lambda: fn(x, grad)
        # read x and grad; write x_new.
        return BenchCase(FAMILY, "langevin_step", label, provider, setup, bytes=3 * numel * size)

    def ours(x, grad):
        return genfast.ops.langevin_step(x, grad, STEP_SIZE, NOISE_SCALE, clamp=CLAMP)

    def reference(x, grad):
        return langevin_step_ref(x, grad, STEP_SIZE, NOISE_SCALE, *CLAMP, seed=_checks.draw_seed(None, device))

    out = [case(f"genfast-{name}", _bound(name, ours)) for name in genfast_providers("langevin_step", device)]
    out.append(case("reference", reference))
    out.extend(case(provider, fn) for provider, fn in _peers(device, eager_langevin).items())
    return out


def _bound(name, fn):
    """fn(*inputs) run under backend ``name``."""
    def call(*args):
        with genfast.backend(name):
            return fn(*args)
    return call


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    out = []
    for shape, dtype in _configs(device, quick):
        out += _reparameterize_cases(shape, dtype, device)
        out += _kl_cases(shape, dtype, device)
        out += _langevin_cases(shape, dtype, device)
    return out
