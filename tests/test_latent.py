"""Latent-variable ops: every kernel backend against the reference, exactly (shared noise) and statistically.

Tolerances follow CONTRIBUTING.md, section 3: a fused result may be off the fp32 reference by at most twice what
torch itself is off when it computes the same formula in the input's precision, plus (atol, rtol).
"""

import math

import pytest
import torch

import genfast
from genfast.kernels import latent as latent_kernels
from genfast.ops import (
    _checks,
    gaussian_kl,
    gaussian_kl_ref,
    langevin_step,
    langevin_step_ref,
    philox_noise_ref,
    reparameterize,
    reparameterize_ref,
)
from tests.conftest import backend_params, serving_backends
from tests.tolerance import assert_close_to_ref

DTYPES = [
    pytest.param(torch.float32, 1e-6, 1e-5, id="fp32"),
    pytest.param(torch.float16, 1e-3, 1e-3, id="fp16"),
    pytest.param(torch.bfloat16, 8e-3, 8e-3, id="bf16"),
]
SHAPES = [(1,), (17,), (1000,), (3, 5, 7)]


def make(shape, dtype, device, *, scale=1.0, requires_grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = (scale * torch.randn(shape, generator=gen)).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def seed_of(generator_seed: int, device) -> torch.Tensor:
    """The Philox seed an op draws from a generator seeded with ``generator_seed``."""
    return _checks.draw_seed(torch.Generator(device=device).manual_seed(generator_seed), torch.device(device))


def kernel_noise(generator_seed: int, like: torch.Tensor) -> torch.Tensor:
    """The eps an op draws in-kernel for ``like`` from a generator seeded with ``generator_seed``."""
    seed = seed_of(generator_seed, like.device)
    return philox_noise_ref(seed, like.numel(), normal=True).reshape(like.shape).to(like.device)


def gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


# ------------------------------------------------------------------------------------------- reparameterize
def reparameterize_lowp(mu, logvar, noise):
    return mu + torch.exp(0.5 * logvar) * noise.to(mu.dtype)


@pytest.mark.parametrize("device,backend", backend_params("reparameterize"))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reparameterize_shared_noise(device, backend, dtype, atol, rtol, shape):
    mu, logvar = make(shape, dtype, device), make(shape, dtype, device, seed=1)
    noise = make(shape, torch.float32, device, seed=2)
    with genfast.backend(backend):
        z = reparameterize(mu, logvar, noise=noise)
    assert z.dtype == dtype and z.shape == mu.shape
    ref = reparameterize_ref(mu.float(), logvar.float(), noise=noise)
    assert_close_to_ref(z, ref, reparameterize_lowp(mu, logvar, noise), atol, rtol)


@pytest.mark.parametrize("device,backend", backend_params("reparameterize"))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_reparameterize_in_kernel_noise(device, backend, dtype, atol, rtol, shape):
    mu, logvar = make(shape, dtype, device), make(shape, dtype, device, seed=1)
    with genfast.backend(backend):
        z = reparameterize(mu, logvar, generator=gen(device, 7))
    noise = kernel_noise(7, mu)
    ref = reparameterize_ref(mu.float(), logvar.float(), noise=noise)
    assert_close_to_ref(z, ref, reparameterize_lowp(mu, logvar, noise), atol, rtol)


@pytest.mark.parametrize("device,backend", backend_params("reparameterize"))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("given_noise", [False, True], ids=["seed", "noise"])
def test_reparameterize_gradients(device, backend, dtype, atol, rtol, given_noise):
    shape = (3, 5, 7)
    mu = make(shape, dtype, device, requires_grad=True)
    logvar = make(shape, dtype, device, seed=1, requires_grad=True)
    noise = kernel_noise(5, mu)
    with genfast.backend(backend):
        kwargs = dict(noise=noise) if given_noise else dict(generator=gen(device, 5))
        z = reparameterize(mu, logvar, **kwargs)
    dz = make(shape, dtype, device, seed=3)
    got = torch.autograd.grad(z, (mu, logvar), dz)
    mu32, logvar32 = mu.detach().float().requires_grad_(), logvar.detach().float().requires_grad_()
    ref = torch.autograd.grad(reparameterize_ref(mu32, logvar32, noise=noise), (mu32, logvar32), dz.float())
    lowp = torch.autograd.grad(reparameterize_lowp(mu, logvar, noise), (mu, logvar), dz)
    for g, r, lp in zip(got, ref, lowp):
        assert g.dtype == dtype
        assert_close_to_ref(g, r, lp, atol, rtol)


@pytest.mark.parametrize("device,backend", backend_params("reparameterize"))
def test_reparameterize_backward_of_expanded_grad(device, backend):
    # z.sum().backward() hands the backward a stride-0 gradient.
    mu = make((4, 33), torch.float32, device, requires_grad=True)
    logvar = make((4, 33), torch.float32, device, seed=1, requires_grad=True)
    with genfast.backend(backend):
        reparameterize(mu, logvar, generator=gen(device, 9)).sum().backward()
    noise = kernel_noise(9, mu)
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * noise)
    torch.testing.assert_close(mu.grad, torch.ones_like(mu))


def test_reparameterize_gradcheck_reference():
    mu = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, lv: reparameterize_ref(m, lv, noise=noise), (mu, logvar))


@pytest.mark.parametrize("device,backend", backend_params("reparameterize"))
def test_reparameterize_non_contiguous(device, backend):
    mu = make((8, 6), torch.float32, device).t()
    logvar = make((6, 16), torch.float32, device, seed=1)[:, ::2]
    assert not mu.is_contiguous()
    with genfast.backend(backend):
        z = reparameterize(mu, logvar, generator=gen(device, 3))
    # eps follows the logical (row-major) order, whatever the strides.
    ref = reparameterize_ref(mu.contiguous(), logvar, noise=kernel_noise(3, mu))
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("device,backend", backend_params("reparameterize") + [pytest.param("cpu", "reference")])
def test_reparameterize_statistics(device, backend):
    # 200k draws per coordinate: mean mu and std exp(0.5 * logvar) within 5 standard errors.
    n = 200_000
    mu_row = torch.tensor([0.5, -2.0], device=device)
    logvar_row = torch.tensor([0.0, math.log(0.25)], device=device)
    with genfast.backend(backend):
        z = reparameterize(mu_row.expand(n, 2), logvar_row.expand(n, 2), generator=gen(device, 11)).double()
    std = torch.exp(0.5 * logvar_row).double()
    mean_err = (z.mean(0) - mu_row.double()).abs()
    std_err = (z.std(0) - std).abs()
    assert bool(torch.all(mean_err < 5 * std / math.sqrt(n))), mean_err
    assert bool(torch.all(std_err < 5 * std / math.sqrt(2 * n))), std_err


@pytest.mark.parametrize("device,backend", backend_params("reparameterize") + [pytest.param("cpu", "reference")])
def test_reparameterize_generator_state_reproduces(device, backend):
    mu, logvar = make((5, 9), torch.float32, device), make((5, 9), torch.float32, device, seed=1)
    with genfast.backend(backend):
        a = reparameterize(mu, logvar, generator=gen(device, 1))
        b = reparameterize(mu, logvar, generator=gen(device, 1))
        c = reparameterize(mu, logvar, generator=gen(device, 2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# ------------------------------------------------------------------------------------------- gaussian_kl
def kl_lowp(mu, logvar):
    return (-0.5 * (1 + logvar - mu * mu - torch.exp(logvar))).reshape(mu.shape[0], -1).sum(1)


@pytest.mark.parametrize("device,backend", backend_params("gaussian_kl"))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(4, 1000), (3, 9000)])
def test_gaussian_kl_per_sample(device, backend, dtype, atol, rtol, shape):
    mu, logvar = make(shape, dtype, device), make(shape, dtype, device, seed=1)
    with genfast.backend(backend):
        kl = gaussian_kl(mu, logvar)
    assert kl.dtype == torch.float32 and kl.shape == (shape[0],)
    ref = gaussian_kl_ref(mu.float(), logvar.float())
    # Row sums of D terms: the reference itself may differ from the kernel by fp32 rounding of long sums.
    assert_close_to_ref(kl, ref, kl_lowp(mu, logvar), atol * shape[-1] ** 0.5, rtol)


@pytest.mark.parametrize("device,backend", backend_params("gaussian_kl"))
@pytest.mark.parametrize("reduction", ["per_sample", "sum", "mean", "none"])
def test_gaussian_kl_reductions(device, backend, reduction):
    mu, logvar = make((6, 3, 11), torch.float32, device), make((6, 3, 11), torch.float32, device, seed=1)
    with genfast.backend(backend):
        got = gaussian_kl(mu, logvar, reduction=reduction)
    torch.testing.assert_close(got, gaussian_kl_ref(mu, logvar, reduction), rtol=1e-5, atol=1e-5)
    per_sample = gaussian_kl_ref(mu.double(), logvar.double())
    expected = {"per_sample": per_sample, "sum": per_sample.sum(), "mean": per_sample.mean(),
                "none": None}[reduction]
    if expected is not None:
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    else:
        assert got.shape == mu.shape


@pytest.mark.parametrize("device,backend", backend_params("gaussian_kl"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gaussian_kl_long_rows_fp32_accumulation(device, backend, dtype):
    rows, cols = 2, 100_003
    splits, _ = latent_kernels.kl_plan(rows, cols, latent_kernels.KL_BLOCK)
    assert splits > 1  # this shape exercises the two-stage (split-row) reduction
    mu, logvar = make((rows, cols), dtype, device), make((rows, cols), dtype, device, seed=1)
    with genfast.backend(backend):
        kl = gaussian_kl(mu, logvar)
    exact = gaussian_kl_ref(mu.double(), logvar.double())
    torch_fp32 = gaussian_kl_ref(mu.float(), logvar.float()).double()
    # Within twice torch's own fp32 error plus a few ulps of the result; rounding each of the 100k terms to
    # fp16 before summing already misses by over 15 ulps, accumulating in bf16 by far more.
    bound = 2 * (torch_fp32 - exact).abs() + 4 * 2**-24 * exact.abs()
    assert bool(torch.all((kl.double() - exact).abs() <= bound)), ((kl.double() - exact).abs(), bound)


@pytest.mark.parametrize("device,backend", backend_params("gaussian_kl"))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("reduction", ["per_sample", "mean"])
def test_gaussian_kl_gradients(device, backend, dtype, atol, rtol, reduction):
    shape = (4, 3, 17)
    mu = make(shape, dtype, device, requires_grad=True)
    logvar = make(shape, dtype, device, seed=1, requires_grad=True)
    weights = make((4,), torch.float32, device, seed=2)
    with genfast.backend(backend):
        out = gaussian_kl(mu, logvar, reduction=reduction)
    got = torch.autograd.grad(out, (mu, logvar), weights if reduction == "per_sample" else None)
    mu32, logvar32 = mu.detach().float().requires_grad_(), logvar.detach().float().requires_grad_()
    ref_out = gaussian_kl_ref(mu32, logvar32, reduction)
    ref = torch.autograd.grad(ref_out, (mu32, logvar32), weights if reduction == "per_sample" else None)
    lowp_out = kl_lowp(mu, logvar)
    lowp_out = lowp_out.float() if reduction == "per_sample" else lowp_out.float().mean()
    lowp = torch.autograd.grad(lowp_out, (mu, logvar), weights if reduction == "per_sample" else None)
    for g, r, lp in zip(got, ref, lowp):
        assert g.dtype == dtype
        assert_close_to_ref(g, r, lp, atol, rtol)


def test_gaussian_kl_gradcheck_reference():
    mu = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for reduction in ("per_sample", "mean", "none"):
        assert torch.autograd.gradcheck(lambda m, lv: gaussian_kl_ref(m, lv, reduction), (mu, logvar))


@pytest.mark.parametrize("device,backend", backend_params("gaussian_kl"))
def test_gaussian_kl_non_contiguous_and_empty(device, backend):
    mu = make((9, 5), torch.float32, device).t()
    logvar = make((5, 9), torch.float32, device, seed=1)
    with genfast.backend(backend):
        kl = gaussian_kl(mu, logvar)
        empty = gaussian_kl(torch.empty(0, 4, device=device), torch.empty(0, 4, device=device))
        zero_cols = gaussian_kl(torch.empty(3, 0, device=device), torch.empty(3, 0, device=device))
    torch.testing.assert_close(kl, gaussian_kl_ref(mu, logvar), rtol=1e-5, atol=1e-5)
    assert empty.shape == (0,)
    assert torch.equal(zero_cols, torch.zeros(3, device=device))


@pytest.mark.parametrize("backend", ["auto", "reference"] + serving_backends("gaussian_kl", "cpu"))
@pytest.mark.parametrize("shape", [(0, 4), (0,), (0, 2, 3), (3, 0)])
@pytest.mark.parametrize("reduction", ["per_sample", "sum", "mean", "none"])
def test_gaussian_kl_empty_batch_on_every_backend(backend, shape, reduction):
    # An empty batch is legal input: [0] per sample, a sum of 0, torch's NaN for the mean of nothing (as
    # torch.mean), and an empty gradient. The reference used to fail reshaping 0 elements to [0, -1].
    mu = torch.zeros(shape, requires_grad=True)
    with genfast.backend(backend):
        kl = gaussian_kl(mu, torch.zeros(shape), reduction=reduction)
    expected = {"per_sample": torch.zeros(shape[0]), "sum": torch.tensor(0.0), "none": torch.zeros(shape),
                "mean": torch.tensor(float("nan") if shape[0] == 0 else 0.0)}[reduction]
    torch.testing.assert_close(kl, expected, equal_nan=True)
    kl.sum().backward()
    assert mu.grad.shape == mu.shape


# ------------------------------------------------------------------------------------------- langevin_step
def langevin_lowp(x, grad, step_size, noise_scale, noise, clamp):
    out = x - step_size * grad + noise_scale * noise.to(x.dtype)
    return out.clamp(*clamp) if clamp else out


CLAMPS = [pytest.param(None, id="noclamp"), pytest.param((-1.0, 1.5), id="clamp")]


@pytest.mark.parametrize("device,backend", backend_params("langevin_step"))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("given_noise", [False, True], ids=["seed", "noise"])
def test_langevin_step(device, backend, dtype, atol, rtol, shape, clamp, given_noise):
    x, grad = make(shape, dtype, device), make(shape, dtype, device, seed=1)
    noise = kernel_noise(4, x)
    with genfast.backend(backend):
        kwargs = dict(noise=noise) if given_noise else dict(generator=gen(device, 4))
        out = langevin_step(x, grad, 0.1, 0.3, clamp=clamp, **kwargs)
    assert out.dtype == dtype and out.shape == x.shape
    lo, hi = clamp or (-math.inf, math.inf)
    ref = langevin_step_ref(x.float(), grad.float(), 0.1, 0.3, lo, hi, noise=noise)
    assert_close_to_ref(out, ref, langevin_lowp(x, grad, 0.1, 0.3, noise, clamp), atol, rtol)


@pytest.mark.parametrize("device,backend", backend_params("langevin_step"))
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("given_noise", [False, True], ids=["seed", "noise"])
def test_langevin_step_gradients(device, backend, dtype, atol, rtol, clamp, given_noise):
    shape = (1000,)
    x = make(shape, dtype, device, requires_grad=True)
    grad = make(shape, dtype, device, seed=1, requires_grad=True)
    noise = kernel_noise(6, x)
    with genfast.backend(backend):
        kwargs = dict(noise=noise) if given_noise else dict(generator=gen(device, 6))
        out = langevin_step(x, grad, 0.2, 0.5, clamp=clamp, **kwargs)
    g = make(shape, dtype, device, seed=3)
    got = torch.autograd.grad(out, (x, grad), g)
    x32, grad32 = x.detach().float().requires_grad_(), grad.detach().float().requires_grad_()
    lo, hi = clamp or (-math.inf, math.inf)
    ref = torch.autograd.grad(langevin_step_ref(x32, grad32, 0.2, 0.5, lo, hi, noise=noise), (x32, grad32), g.float())
    if clamp:
        mask = (ref[0] == 0)
        assert 0.1 < mask.float().mean() < 0.9  # the clamp bites on part of the tensor, so the mask is tested
    lowp = torch.autograd.grad(langevin_lowp(x, grad, 0.2, 0.5, noise, clamp), (x, grad), g)
    for gg, r, lp in zip(got, ref, lowp):
        assert gg.dtype == dtype
        assert_close_to_ref(gg, r, lp, atol, rtol)


def test_langevin_step_gradcheck_reference():
    x = torch.randn(20, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(20, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(20, dtype=torch.float64)
    # Keep values away from the clamp bounds, where the function is not differentiable.
    value = (x - 0.1 * grad + 0.2 * noise).detach()
    keep = ((value + 1).abs() > 1e-3) & ((value - 1).abs() > 1e-3)
    x, grad, noise = x[keep].detach().requires_grad_(), grad[keep].detach().requires_grad_(), noise[keep]
    assert torch.autograd.gradcheck(lambda a, b: langevin_step_ref(a, b, 0.1, 0.2, -1.0, 1.0, noise=noise), (x, grad))


@pytest.mark.parametrize("device,backend", backend_params("langevin_step"))
def test_langevin_step_non_contiguous_and_noise_free(device, backend):
    x = make((7, 4), torch.float32, device).t()
    grad = make((4, 7), torch.float32, device, seed=1)
    with genfast.backend(backend):
        out = langevin_step(x, grad, 0.25, 0.0, generator=gen(device, 1))
        noisy = langevin_step(x, grad, 0.25, 0.7, generator=gen(device, 1))
    torch.testing.assert_close(out, x - 0.25 * grad)  # noise_scale 0: plain gradient descent
    torch.testing.assert_close(noisy, x - 0.25 * grad + 0.7 * kernel_noise(1, x))


@pytest.mark.parametrize("device,backend", backend_params("langevin_step"))
def test_langevin_step_statistics(device, backend):
    n = 100_000
    x = torch.full((n,), 2.0, device=device)
    grad = torch.full((n,), 4.0, device=device)
    with genfast.backend(backend):
        out = langevin_step(x, grad, 0.25, 0.5, generator=gen(device, 2)).double()
    assert abs(out.mean().item() - 1.0) < 5 * 0.5 / math.sqrt(n)
    assert abs(out.std().item() - 0.5) < 5 * 0.5 / math.sqrt(2 * n)


# ------------------------------------------------------------------------------------------- bad input
def _f32(*shape, device="cpu", dtype=torch.float32):
    return torch.zeros(shape, device=device, dtype=dtype)


BAD_INPUTS = [
    (lambda: reparameterize([1.0], _f32(3)), TypeError, "mu must be a torch.Tensor"),
    (lambda: reparameterize(_f32(3), _f32(4)), ValueError, "logvar has shape"),
    (lambda: reparameterize(_f32(3), _f32(3, dtype=torch.float16)), TypeError, "logvar has dtype"),
    (lambda: reparameterize(_f32(3, dtype=torch.int32), _f32(3, dtype=torch.int32)), TypeError, "mu must have dtype"),
    (lambda: reparameterize(_f32(3), _f32(3, device="meta")), ValueError, "logvar is on meta"),
    (lambda: reparameterize(_f32(3), _f32(3), noise=_f32(4)), ValueError, "noise has shape"),
    (lambda: reparameterize(_f32(3), _f32(3), noise=_f32(3), generator=torch.Generator()), ValueError, "not both"),
    (lambda: reparameterize(_f32(3, device="meta"), _f32(3, device="meta"), generator=torch.Generator()),
     ValueError, "generator is on cpu"),
    (lambda: reparameterize(_f32(3), _f32(3), generator=3), TypeError, "generator must be"),
    (lambda: gaussian_kl(_f32(2, 3), _f32(2, 4)), ValueError, "logvar has shape"),
    (lambda: gaussian_kl(_f32(2, 3), _f32(2, 3, dtype=torch.bfloat16)), TypeError, "logvar has dtype"),
    (lambda: gaussian_kl(_f32(2, 3), _f32(2, 3, device="meta")), ValueError, "logvar is on meta"),
    (lambda: gaussian_kl(_f32(2, 3), _f32(2, 3), reduction="batchmean"), ValueError, "reduction must be one of"),
    (lambda: gaussian_kl(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "at least 1 dimension"),
    (lambda: langevin_step(_f32(3), _f32(3), -0.1, 1.0), ValueError, "step_size must be finite and >= 0"),
    (lambda: langevin_step(_f32(3), _f32(3), math.inf, 1.0), ValueError, "step_size must be finite"),
    (lambda: langevin_step(_f32(3), _f32(3), 0.1, -1.0), ValueError, "noise_scale must be finite and >= 0"),
    (lambda: langevin_step(_f32(3), _f32(3), 0.1, math.nan), ValueError, "noise_scale must not be NaN"),
    (lambda: langevin_step(_f32(3), _f32(3), "0.1", 1.0), TypeError, "step_size must be a real number"),
    (lambda: langevin_step(_f32(3), _f32(3), 0.1, 1.0, clamp=(1.0, 1.0)), ValueError, "lo < hi"),
    (lambda: langevin_step(_f32(3), _f32(3), 0.1, 1.0, clamp=(2.0, -1.0)), ValueError, "lo < hi"),
    (lambda: langevin_step(_f32(3), _f32(3), 0.1, 1.0, clamp=1.0), TypeError, "clamp must be None or a pair"),
    (lambda: langevin_step(_f32(3), _f32(5), 0.1, 1.0), ValueError, "grad has shape"),
    (lambda: langevin_step(_f32(3), _f32(3, device="meta"), 0.1, 1.0), ValueError, "grad is on meta"),
    (lambda: langevin_step(_f32(3, device="meta"), _f32(3, device="meta"), 0.1, 1.0, generator=torch.Generator()),
     ValueError, "generator is on cpu"),
]


@pytest.mark.parametrize("call,error,match", BAD_INPUTS)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------- opcheck, compile
def _op(name, backend):
    return getattr(torch.ops.genfast, name + ("_triton" if backend == "triton" else ""))


@pytest.mark.parametrize("device,backend", backend_params("reparameterize"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck(device, backend, dtype):
    mu = make((3, 5), dtype, device, requires_grad=True)
    logvar = make((3, 5), dtype, device, seed=1, requires_grad=True)
    noise, seed = make((3, 5), torch.float32, device, seed=2), torch.tensor([99], device=device)
    grad = make((3, 5), dtype, device, seed=3)
    for noise_arg, seed_arg in ((noise, None), (None, seed)):
        torch.library.opcheck(_op("reparameterize", backend), (mu, logvar, noise_arg, seed_arg))
        torch.library.opcheck(_op("reparameterize_backward", backend), (grad, logvar.detach(), noise_arg, seed_arg))
        for clamp in ((-math.inf, math.inf), (-0.5, 0.5)):
            torch.library.opcheck(_op("langevin_step", backend), (mu, logvar, 0.1, 0.2, *clamp, noise_arg, seed_arg))
    torch.library.opcheck(_op("gaussian_kl", backend), (mu, logvar))
    torch.library.opcheck(_op("gaussian_kl_backward", backend),
                          (make((3,), torch.float32, device), mu.detach(), logvar.detach()))


@pytest.mark.parametrize("device,backend", backend_params("reparameterize"))
def test_compile_fullgraph(device, backend):
    mu = make((4, 6), torch.float32, device, requires_grad=True)
    logvar = make((4, 6), torch.float32, device, seed=1, requires_grad=True)
    noise = make((4, 6), torch.float32, device, seed=2)

    def vae_loss(m, lv, eps):
        z = reparameterize(m, lv, noise=eps)
        return (z * z).sum() + gaussian_kl(m, lv, reduction="mean")

    def sampled(m, lv):
        z = reparameterize(m, lv)  # generator=None: the seed is drawn inside the graph
        return langevin_step(z, z, 0.1, 0.2, clamp=(-3.0, 3.0)), langevin_step(m, lv, 0.1, 0.2, noise=noise)

    with genfast.backend(backend):
        eager = vae_loss(mu, logvar, noise)
        eager_grads = torch.autograd.grad(eager, (mu, logvar))
        compiled = torch.compile(vae_loss, fullgraph=True)(mu, logvar, noise)
        compiled_grads = torch.autograd.grad(compiled, (mu, logvar))
        stepped, deterministic = torch.compile(sampled, fullgraph=True)(mu, logvar)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)
    assert stepped.shape == mu.shape and bool(torch.all(stepped.abs() <= 3.0))
    torch.testing.assert_close(deterministic, mu - 0.1 * logvar + 0.2 * noise)
