"""The fused diffusion ops (scheduler_step, cfg_combine) on every backend against their references."""

import math

import pytest
import torch

import genfast
from genfast.diffusion import DDIMScheduler, DDPMScheduler
from genfast.ops import cfg_combine, cfg_combine_ref, philox_noise, scheduler_step, scheduler_step_ref
from genfast.ops import diffusion as D
from tests.conftest import backend_params
from tests.tolerance import assert_close_to_ref

# (dtype, atol): err(fused) <= 2 * err(the same formula in torch at that dtype) + atol * scale (CONTRIBUTING.md 3).
DTYPES = [(torch.float32, 1e-5), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)]
SHAPES = [(1,), (1000,), (3, 5, 7, 9)]


def coef_rows() -> dict[str, torch.Tensor]:
    """Realistic rows: a DDPM step with clipping, a DDIM v-prediction step with eta, and a dense row."""
    ddpm = DDPMScheduler(clip_sample=True)
    ddpm.set_timesteps(50)
    ddim = DDIMScheduler(prediction_type="v_prediction", clip_sample=False, beta_schedule="scaled_linear")
    ddim.set_timesteps(20)
    dense = torch.tensor([1.3, -0.7, -1.5, 1.2, 0.4, 0.9, -0.3, 0.8, 0.5, 0.2, 0.6])
    return {"ddpm": ddpm._coef_table(0.0, False)[10], "ddim": ddim._coef_table(0.8, False)[5], "dense": dense}


ROWS = coef_rows()


def lowp_formula(x, m, u, g, c, noise):
    """The step formula run by torch in the inputs' own dtype: the yardstick for rounding error."""
    c = c.to(x.dtype)
    if u is not None:
        m = u + g * (m - u)
    x0 = torch.clamp(c[D.AX] * x + c[D.AM] * m, c[D.CLIP_LO].float().item(), c[D.CLIP_HI].float().item())
    prev = c[D.P0] * x0 + c[D.PE] * (c[D.EX] * x + c[D.EM] * m + c[D.E0] * x0) + c[D.PX] * x
    if noise is not None:
        prev = prev + c[D.SIGMA] * noise.to(x.dtype)
    return prev


def assert_within(got, exact, lowp, atol):
    """The rule with the floor scaled by the values' magnitude (at least 1)."""
    assert_close_to_ref(got, exact, lowp, atol * max(1.0, exact.abs().max().item()))


def inputs(shape, dtype, uncond, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    m = torch.randn(shape, generator=gen).to(dtype)
    u = torch.randn(shape, generator=gen).to(dtype) if uncond else None
    return x, m, u


@pytest.mark.parametrize("device,backend", backend_params("scheduler_step"))
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("row", list(ROWS))
@pytest.mark.parametrize("uncond", [False, True])
@pytest.mark.parametrize("noise_mode", ["none", "tensor", "seed"])
def test_step_matches_reference(device, backend, dtype, atol, shape, row, uncond, noise_mode):
    x, m, u = (t.to(device) if t is not None else None for t in inputs(shape, dtype, uncond))
    c = ROWS[row].to(device)
    g = 4.5 if uncond else 1.0
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(device)
    seed = 1234
    kwargs = dict(model_output_uncond=u, guidance_scale=g)
    with genfast.backend(backend):
        if noise_mode == "none":
            got = scheduler_step(x, m, c, add_noise=False, **kwargs)
        elif noise_mode == "tensor":
            got = scheduler_step(x, m, c, noise=noise, **kwargs)
        else:
            got = scheduler_step(x, m, c, generator=torch.Generator(device).manual_seed(seed), **kwargs)
    # Under the same generator state, the seed the op drew is this one.
    drawn = genfast.ops._checks.draw_seed(torch.Generator(device).manual_seed(seed), torch.device(device))
    used = {"none": None, "tensor": noise, "seed": philox_noise(drawn.cpu(), x.numel(), normal=True).view(shape)}
    used = used[noise_mode]
    as32 = lambda t: t.float().cpu() if t is not None else None  # noqa: E731
    exact = scheduler_step_ref(as32(x), as32(m), as32(u), g, c.cpu(), as32(used), None)
    lowp = lowp_formula(x.cpu(), m.cpu(), as32(u).to(dtype) if u is not None else None, g, c.cpu(), used)
    assert got.dtype == dtype and got.shape == x.shape and got.is_contiguous()
    assert_within(got.cpu(), exact, lowp, atol)


@pytest.mark.parametrize("device,backend", backend_params("scheduler_step"))
def test_step_noncontiguous(device, backend):
    base = torch.randn(2, 6, 10, generator=torch.Generator().manual_seed(1)).to(device)
    x = base.transpose(1, 2)  # [2, 10, 6], strided
    m = torch.randn(2, 10, 12, generator=torch.Generator().manual_seed(2)).to(device)[..., ::2]
    u = torch.randn(2, 10, 6, generator=torch.Generator().manual_seed(3)).to(device)
    noise = torch.randn(2, 6, 10, generator=torch.Generator().manual_seed(4)).to(device).transpose(1, 2)
    c = ROWS["dense"].to(device)
    with genfast.backend(backend):
        got = scheduler_step(x, m, c, model_output_uncond=u, guidance_scale=2.0, noise=noise)
    exp = scheduler_step_ref(x.contiguous(), m.contiguous(), u, 2.0, c, noise.contiguous(), None)
    torch.testing.assert_close(got, exp, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_params("scheduler_step"))
def test_in_kernel_noise_is_philox_at_flat_index(device, backend):
    # With every coefficient 0 but SIGMA = 1 the step returns its noise: exactly philox normal(seed, i).
    c = torch.zeros(11, device=device)
    c[D.SIGMA] = 1.0
    x = torch.zeros(3, 17, 19, device=device)
    with genfast.backend(backend):
        got = scheduler_step(x, x, c, generator=torch.Generator(device).manual_seed(5))
    seed = genfast.ops._checks.draw_seed(torch.Generator(device).manual_seed(5), torch.device(device))
    exp = philox_noise(seed.cpu(), x.numel(), normal=True).view(x.shape)
    torch.testing.assert_close(got.cpu(), exp, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("device,backend", backend_params("scheduler_step"))
def test_in_kernel_noise_statistics(device, backend):
    c = torch.zeros(11, device=device)
    c[D.SIGMA] = 0.5
    numel = 1 << (13 if backend == "triton" else 17)
    x = torch.zeros(numel, device=device)
    with genfast.backend(backend):
        a = scheduler_step(x, x, c, generator=torch.Generator(device).manual_seed(1)).double().cpu()
        b = scheduler_step(x, x, c, generator=torch.Generator(device).manual_seed(2)).double().cpu()
    for sample in (a, b):  # N(0, 0.25): mean and variance within 5 standard errors
        assert abs(sample.mean().item()) < 5 * 0.5 / math.sqrt(numel)
        assert abs(sample.var().item() - 0.25) < 5 * 0.25 * math.sqrt(2 / numel)
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 5 / math.sqrt(numel)


@pytest.mark.parametrize("device,backend", backend_params("scheduler_step"))
def test_zero_sigma_draws_nothing(device, backend):
    x, m, _ = (t.to(device) if t is not None else None for t in inputs((257,), torch.float32, False))
    c = ROWS["dense"].clone().to(device)
    c[D.SIGMA] = 0.0
    with genfast.backend(backend):
        with_seed = scheduler_step(x, m, c, generator=torch.Generator(device).manual_seed(3))
        without = scheduler_step(x, m, c, add_noise=False)
    assert torch.equal(with_seed, without)


@pytest.mark.parametrize("device,backend", backend_params("scheduler_step"))
def test_guidance_scale_one_equals_cond_alone(device, backend):
    x, m, u = (t.to(device) for t in inputs((3, 5, 7, 9), torch.float32, True))
    c = ROWS["ddpm"].to(device)
    with genfast.backend(backend):
        guided = scheduler_step(x, m, c, model_output_uncond=u, guidance_scale=1.0, add_noise=False)
        alone = scheduler_step(x, m, c, add_noise=False)
    # u + 1 * (m - u) is m up to one rounding of each operation.
    torch.testing.assert_close(guided, alone, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_params("scheduler_step"))
def test_fused_guidance_equals_cfg_then_step(device, backend):
    x, m, u = (t.to(device) for t in inputs((1000,), torch.float32, True))
    c = ROWS["ddim"].to(device)
    with genfast.backend(backend):
        fused = scheduler_step(x, m, c, model_output_uncond=u, guidance_scale=7.5, add_noise=False)
        split = scheduler_step(x, cfg_combine(u, m, 7.5), c, add_noise=False)
    torch.testing.assert_close(fused, split, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_params("cfg_combine"))
@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cfg_combine_matches_reference(device, backend, dtype, atol, shape):
    _, c, u = (t.to(device) for t in inputs(shape, dtype, True))
    with genfast.backend(backend):
        got = cfg_combine(u, c, 7.5)
    exact = cfg_combine_ref(u.float().cpu(), c.float().cpu(), 7.5).float()
    lowp = u.cpu() + 7.5 * (c.cpu() - u.cpu())
    assert got.dtype == dtype and got.shape == u.shape
    assert_within(got.cpu(), exact, lowp, atol)
    # non-contiguous
    with genfast.backend(backend):
        strided = cfg_combine(u.reshape(-1)[::1].flip(0), c.reshape(-1).flip(0), 7.5)
    assert_within(strided.cpu().flip(0), exact.reshape(-1), lowp.reshape(-1), atol)


@pytest.mark.parametrize("device,backend", backend_params("scheduler_step"))
@pytest.mark.parametrize("uncond", [False, True])
def test_step_gradients(device, backend, uncond):
    x, m, u = (t.to(device) if t is not None else None for t in inputs((4, 33), torch.float32, uncond, seed=3))
    noise = torch.randn(4, 33, generator=torch.Generator().manual_seed(8)).to(device)
    c = ROWS["dense"].to(device)  # clips at [-1.5, 1.2]: some elements clamp, so the mask is exercised
    leaves = [t.clone().requires_grad_() for t in (x, m, noise) + ((u,) if uncond else ())]
    grad_out = torch.randn(4, 33, generator=torch.Generator().manual_seed(4)).to(device)

    def run(fn):
        xs, ms, ns = leaves[0], leaves[1], leaves[2]
        us = leaves[3] if uncond else None
        out = fn(xs, ms, us, ns)
        return torch.autograd.grad(out, leaves, grad_out)

    with genfast.backend(backend):
        got = run(lambda xs, ms, us, ns: scheduler_step(xs, ms, c, model_output_uncond=us, guidance_scale=3.0,
                                                        noise=ns))
    exp = run(lambda xs, ms, us, ns: scheduler_step_ref(xs, ms, us, 3.0, c, ns, None))
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", backend_params("cfg_combine"))
def test_cfg_combine_gradients(device, backend):
    u = torch.randn(5, 7, device=device, requires_grad=True)
    c = torch.randn(5, 7, device=device, requires_grad=True)
    grad = torch.randn(5, 7, device=device)
    with genfast.backend(backend):
        got = torch.autograd.grad(cfg_combine(u, c, 2.5), (u, c), grad)
    exp = torch.autograd.grad(cfg_combine_ref(u, c, 2.5), (u, c), grad)
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b)


def _step_op(backend):
    return torch.ops.genfast.scheduler_step_triton if backend == "triton" else torch.ops.genfast.scheduler_step


def _cfg_op(backend):
    return torch.ops.genfast.cfg_combine_triton if backend == "triton" else torch.ops.genfast.cfg_combine


@pytest.mark.parametrize("device,backend", backend_params("scheduler_step"))
def test_opcheck(device, backend):
    x, m, u = (t.to(device) for t in inputs((3, 11), torch.float32, True))
    x.requires_grad_()
    m.requires_grad_()
    c = ROWS["dense"].to(device)
    noise = torch.randn(3, 11, device=device)
    seed = torch.tensor([77], device=device)
    for args in [(x, m, None, 1.0, c, None, None), (x, m, u, 5.0, c, noise, None), (x, m, u, 2.0, c, None, seed),
                 (x.detach().half(), m.detach().half(), None, 1.0, c, noise, None)]:
        torch.library.opcheck(_step_op(backend), args)
    torch.library.opcheck(_cfg_op(backend), (u.requires_grad_(), m, 7.5))


@pytest.mark.parametrize("device,backend", backend_params("scheduler_step"))
def test_compile_fullgraph(device, backend):
    x, m, u = (t.to(device) for t in inputs((2, 3, 8), torch.float32, True))
    c = ROWS["ddim"].to(device)
    noise = torch.randn(2, 3, 8, device=device)

    def step(x, m, u, noise):
        return scheduler_step(x, m, c, model_output_uncond=u, guidance_scale=6.0, noise=noise) * 2

    def step_drawn(x, m):
        return cfg_combine(x, m, 2.0) + scheduler_step(x, m, c, generator=None)

    with genfast.backend(backend):
        compiled = torch.compile(step, fullgraph=True)
        torch.testing.assert_close(compiled(x, m, u, noise), step(x, m, u, noise))
        drawn = torch.compile(step_drawn, fullgraph=True)(x, m)
    assert drawn.shape == x.shape and torch.isfinite(drawn).all()


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda x, c: scheduler_step(x, x[:-1], c), ValueError, "model_output has shape"),
        (lambda x, c: scheduler_step(x, x, c, model_output_uncond=x[:, :2]), ValueError, "model_output_uncond has"),
        (lambda x, c: scheduler_step(x.double(), x.double(), c), TypeError, "sample must have dtype"),
        (lambda x, c: scheduler_step(x.int(), x, c), TypeError, "sample must have dtype"),
        (lambda x, c: scheduler_step(x, x.half(), c), TypeError, "model_output has dtype"),
        (lambda x, c: scheduler_step(x, x.to("meta"), c), ValueError, "model_output is on meta"),
        (lambda x, c: scheduler_step(x, x, c.to("meta")), ValueError, "coefs is on meta"),
        (lambda x, c: scheduler_step(x, x, c[:10]), ValueError, "coefs must hold 11"),
        (lambda x, c: scheduler_step(x, x, c.double()), TypeError, "coefs must have dtype"),
        (lambda x, c: scheduler_step(x, x, c.view(1, 11)), ValueError, "coefs must be 1-D"),
        (lambda x, c: scheduler_step(x, x, c, noise=x[:1]), ValueError, "noise has shape"),
        (lambda x, c: scheduler_step(x, x, c, noise=x, generator=torch.Generator()), ValueError, "not both"),
        (lambda x, c: scheduler_step(x, x, c, generator=7), TypeError, "generator must be"),
        (lambda x, c: scheduler_step(x, x, c, add_noise=False, noise=x), ValueError, "add_noise=False"),
        (lambda x, c: scheduler_step(x, x, c, guidance_scale="7"), TypeError, "guidance_scale must be"),
        (lambda x, c: scheduler_step(x.tolist(), x, c), TypeError, "sample must be a torch.Tensor"),
        (lambda x, c: cfg_combine(x, x[:1], 2.0), ValueError, "cond has shape"),
        (lambda x, c: cfg_combine(x, x.half(), 2.0), TypeError, "cond has dtype"),
        (lambda x, c: cfg_combine(x, x, float("nan")), ValueError, "guidance_scale must not be NaN"),
    ],
)
def test_bad_input(make, error, match):
    x = torch.randn(4, 5)
    with pytest.raises(error, match=match):
        make(x, ROWS["dense"])
