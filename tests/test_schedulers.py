"""genfast's DDPM/DDIM schedulers against diffusers', and the fused steps against the reference step."""

import itertools

import diffusers
import numpy as np
import pytest
import torch

import genfast
from genfast.diffusion import DDIMScheduler, DDPMScheduler, SchedulerOutput
from tests.conftest import backend_params

BACKENDS = ["reference"] + [p.values[1] for p in backend_params("scheduler_step") if p.values[0] == "cpu"]
SHAPE = (2, 3, 5, 7)


def tensors(seed=0, shape=SHAPE):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(3)]


def assert_matches(got, exp):
    # The coefficients are rounded once from float64 where diffusers chains float32 operations, so
    # the two differ by a few float32 ulps of the largest term (x0 / sqrt(alpha_bar) near t = T).
    scale = exp.abs().max().item()
    torch.testing.assert_close(got, exp, rtol=2e-5, atol=2e-5 * max(1.0, scale))


def walk_against_diffusers(ours, theirs, steps, eta=None, use_clipped=False):
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    x, m, noise = tensors()
    for t in theirs.timesteps:
        m = torch.tanh(m + 0.1 * x)  # a stand-in model, different at every step
        if eta is None:  # DDPM: diffusers draws torch.randn(generator); give genfast that very noise
            exp = theirs.step(m, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))
            kwargs = {}
        else:
            exp = theirs.step(m, t, x, eta=eta, use_clipped_model_output=use_clipped, variance_noise=noise).prev_sample
            kwargs = dict(eta=eta, use_clipped_model_output=use_clipped)
        for backend in BACKENDS:
            with genfast.backend(backend):
                got = ours.step(m, t, x, noise=noise, **kwargs)
            assert isinstance(got, SchedulerOutput)
            assert_matches(got.prev_sample, exp)
        x = exp


GRID = list(itertools.product(["epsilon", "v_prediction", "sample"], ["linear", "scaled_linear", "squaredcos_cap_v2"],
                              ["leading", "trailing", "linspace"]))


@pytest.mark.parametrize("prediction_type,beta_schedule,spacing", GRID)
def test_ddpm_matches_diffusers(prediction_type, beta_schedule, spacing):
    theirs = diffusers.DDPMScheduler(prediction_type=prediction_type, beta_schedule=beta_schedule,
                                     timestep_spacing=spacing, clip_sample=prediction_type != "epsilon")
    walk_against_diffusers(DDPMScheduler.from_config(theirs.config), theirs, 12)


@pytest.mark.parametrize("prediction_type,beta_schedule,spacing", GRID)
def test_ddim_matches_diffusers(prediction_type, beta_schedule, spacing):
    theirs = diffusers.DDIMScheduler(prediction_type=prediction_type, beta_schedule=beta_schedule,
                                     timestep_spacing=spacing, clip_sample=prediction_type == "epsilon")
    walk_against_diffusers(DDIMScheduler.from_config(theirs.config), theirs, 12, eta=0.0)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large"])
@pytest.mark.parametrize("steps_offset,clip_sample_range", [(0, 1.0), (1, 0.5)])
def test_ddpm_options_match_diffusers(variance_type, steps_offset, clip_sample_range):
    theirs = diffusers.DDPMScheduler(variance_type=variance_type, steps_offset=steps_offset, clip_sample=True,
                                     clip_sample_range=clip_sample_range, beta_schedule="scaled_linear",
                                     beta_start=0.00085, beta_end=0.012)
    walk_against_diffusers(DDPMScheduler.from_config(theirs.config), theirs, 10)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("set_alpha_to_one,steps_offset", [(True, 0), (False, 1)])
@pytest.mark.parametrize("use_clipped", [False, True])
def test_ddim_options_match_diffusers(eta, set_alpha_to_one, steps_offset, use_clipped):
    theirs = diffusers.DDIMScheduler(set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset, clip_sample=True,
                                     beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    walk_against_diffusers(DDIMScheduler.from_config(theirs.config), theirs, 10, eta=eta, use_clipped=use_clipped)


def test_zero_terminal_snr_and_trained_betas_match_diffusers():
    theirs = diffusers.DDIMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                                     timestep_spacing="trailing", clip_sample=False)
    walk_against_diffusers(DDIMScheduler.from_config(theirs.config), theirs, 8, eta=0.3)
    betas = np.linspace(1e-4, 0.03, 100)
    theirs = diffusers.DDPMScheduler(num_train_timesteps=100, trained_betas=betas)
    ours = DDPMScheduler.from_config(theirs.config)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    walk_against_diffusers(ours, theirs, 7)


@pytest.mark.parametrize("cls,their_cls", [(DDPMScheduler, diffusers.DDPMScheduler),
                                           (DDIMScheduler, diffusers.DDIMScheduler)])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 7, 50, 1000])
def test_timesteps_match_diffusers(cls, their_cls, spacing, steps):
    theirs = their_cls(timestep_spacing=spacing)
    ours = cls.from_config(theirs.config)
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)


def test_add_noise_matches_diffusers():
    theirs = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    ours = DDPMScheduler.from_config(theirs.config)
    x, noise, _ = tensors()
    t = torch.tensor([0, 999])
    torch.testing.assert_close(ours.add_noise(x, noise, t), theirs.add_noise(x, noise, t))
    torch.testing.assert_close(ours.add_noise(x, noise, 500), theirs.add_noise(x, noise, torch.tensor([500])))
    assert ours.scale_model_input(x, 3) is x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls,eta", [(DDPMScheduler, None), (DDIMScheduler, 0.0), (DDIMScheduler, 1.0)])
def test_sampling_loop_agrees_with_reference(backend, cls, eta):
    """A whole loop with in-kernel noise and fused guidance: every backend walks the reference's chain."""

    def sample(which):
        scheduler = cls(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
        scheduler.set_timesteps(15)
        gen = torch.Generator().manual_seed(42)
        x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
        kwargs = {} if eta is None else dict(eta=eta)
        with genfast.backend(which):
            for t in scheduler.timesteps:
                cond, uncond = 0.3 * torch.tanh(x), -0.2 * x
                x = scheduler.step(cond, t, x, generator=gen, model_output_uncond=uncond, guidance_scale=5.0,
                                   **kwargs).prev_sample
        return x, gen.get_state()

    got, state = sample(backend)
    exp, ref_state = sample("reference")
    torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-4 * exp.abs().max().item())
    assert torch.equal(state, ref_state)  # the same number of seeds drawn
    if eta == 0.0:  # DDIM with eta = 0 is deterministic and draws nothing
        assert torch.equal(sample(backend)[0], got)
        assert torch.equal(state, torch.Generator().manual_seed(42).get_state())


@pytest.mark.parametrize("backend", BACKENDS)
def test_timestep_forms_agree(backend):
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    x, m, noise = tensors()
    t = int(scheduler.timesteps[3])
    with genfast.backend(backend):
        outs = [scheduler.step(m, form, x, noise=noise, eta=0.5).prev_sample
                for form in (t, np.int64(t), torch.tensor(t), torch.tensor([t]), scheduler.timesteps[3])]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_device_matched_timestep(backend):
    """The lookup used for device tensors (exercised here on CPU tensors) finds the same step."""
    scheduler = DDPMScheduler(clip_sample=False)
    scheduler.set_timesteps(20)
    x, m, noise = tensors()
    assert scheduler._device_step_index(scheduler.timesteps[4]) == 4  # a view: found from its offset
    index = scheduler._device_step_index(torch.tensor(int(scheduler.timesteps[4])))  # matched on the device
    assert isinstance(index, torch.Tensor) and int(index) == 4
    with genfast.backend(backend):
        on_device = scheduler._run_step(index, m, x, None, noise, None, 1.0, False)[0]
        on_host = scheduler.step(m, scheduler.timesteps[4], x, noise=noise).prev_sample
    torch.testing.assert_close(on_device, on_host, rtol=0, atol=0)


def test_compile_fullgraph_step():
    scheduler = DDIMScheduler(prediction_type="v_prediction")
    scheduler.set_timesteps(10)
    x, m, noise = tensors()
    t = int(scheduler.timesteps[2])
    scheduler.step(m, t, x, noise=noise, eta=0.5)  # builds the coefficient table outside the graph

    def step(m, x, noise):
        return scheduler.step(m, t, x, noise=noise, eta=0.5).prev_sample

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(m, x, noise), step(m, x, noise))


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: DDIMScheduler.from_config({"thresholding": True}), ValueError, "thresholding"),
        (lambda: DDIMScheduler.from_config({"clip_sample": False, "foo_bar": 1}), ValueError, "'foo_bar'"),
        (lambda: DDIMScheduler.from_config([1]), TypeError, "config must be a dict"),
        (lambda: DDPMScheduler(beta_schedule="sigmoid"), ValueError, "beta_schedule must be one of"),
        (lambda: DDPMScheduler(variance_type="learned_range"), ValueError, "variance_type"),
        (lambda: DDPMScheduler(variance_type="fixed_large_log"), ValueError, "variance_type"),
        (lambda: DDPMScheduler(prediction_type="x0"), ValueError, "prediction_type"),
        (lambda: DDIMScheduler(timestep_spacing="even"), ValueError, "timestep_spacing"),
        (lambda: DDIMScheduler(num_train_timesteps=0), ValueError, "num_train_timesteps"),
        (lambda: DDIMScheduler(clip_sample_range=0.0), ValueError, "clip_sample_range"),
        (lambda: DDPMScheduler(num_train_timesteps=10, trained_betas=[0.1] * 9), ValueError, "trained_betas"),
        (lambda: DDIMScheduler().set_timesteps(1001), ValueError, "cannot exceed num_train_timesteps"),
        (lambda: DDIMScheduler().set_timesteps(0), ValueError, "num_inference_steps must be"),
        (lambda: DDIMScheduler(steps_offset=1).set_timesteps(1000), ValueError, "steps_offset"),
        # The schedule itself (every step used to be NaN): betas in (0, 1), growing, alphas_cumprod above 0.
        (lambda: DDPMScheduler(beta_start=0.5, beta_end=2.0), ValueError, "beta_end must be in \\(0, 1\\)"),
        (lambda: DDIMScheduler(beta_start=0.5, beta_end=2.0), ValueError, "beta_end must be in \\(0, 1\\)"),
        (lambda: DDPMScheduler(beta_start=-0.001), ValueError, "beta_start must be in"),
        (lambda: DDIMScheduler(beta_start=0.0), ValueError, "beta_start must be in"),
        (lambda: DDPMScheduler(beta_end=float("nan")), ValueError, "beta_end must be in"),
        (lambda: DDIMScheduler(beta_schedule="scaled_linear", beta_end=1.0), ValueError, "beta_end must be in"),
        (lambda: DDPMScheduler(beta_start=0.02, beta_end=0.001), ValueError, "beta_start=0.02 must not exceed"),
        (lambda: DDIMScheduler(beta_start=0.02, beta_end=0.001), ValueError, "beta_start=0.02 must not exceed"),
        (lambda: DDPMScheduler(beta_start="0.1"), TypeError, "beta_start must be a real number"),
        (lambda: DDPMScheduler(num_train_timesteps=3, trained_betas=[0.1, -0.2, 0.3]), ValueError,
         "trained_betas\\[1\\] = -0.2"),
        (lambda: DDIMScheduler(num_train_timesteps=3, trained_betas=[0.1, 0.2, 1.0]), ValueError,
         "trained_betas must all lie in \\(0, 1\\)"),
        (lambda: DDIMScheduler(num_train_timesteps=2, trained_betas=["a", "b"]), TypeError, "trained_betas"),
        (lambda: DDPMScheduler(beta_start=0.5, beta_end=0.9), ValueError, "alphas_cumprod reaches 0"),
        (lambda: DDIMScheduler(beta_start=0.5, beta_end=0.9), ValueError, "alphas_cumprod reaches 0"),
        (lambda: DDPMScheduler(num_train_timesteps=-3), ValueError, "num_train_timesteps"),
        (lambda: DDPMScheduler(num_train_timesteps=True), ValueError, "num_train_timesteps"),
    ],
)
def test_bad_options(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_edge_of_the_valid_schedule_steps_to_finite_values(cls):
    # Constant betas (beta_start == beta_end), a single trained timestep, and betas close to 1 are all legal.
    x, m, noise = tensors()
    for scheduler in (cls(beta_start=0.01, beta_end=0.01), cls(num_train_timesteps=1, trained_betas=[0.5]),
                      cls(num_train_timesteps=10, beta_start=0.9, beta_end=0.95, clip_sample=False)):
        scheduler.set_timesteps(1)
        out = scheduler.step(m, scheduler.timesteps[0], x, noise=noise).prev_sample
        assert torch.isfinite(out).all()


def test_reference_backend_goes_through_the_ops_one_dispatcher(monkeypatch):
    # One dispatcher: under backend("reference") the step is scheduler_step's registered reference, not a second
    # code path inside the scheduler.
    from genfast import _backend
    from genfast.ops import diffusion as diffusion_ops

    calls = []

    def spy(*args):
        calls.append(args)
        return diffusion_ops.scheduler_step_ref(*args)

    monkeypatch.setattr(_backend.DISPATCHERS["scheduler_step"], "reference", spy)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    x, m, noise = tensors()
    with genfast.backend("reference"):
        scheduler.step(m, scheduler.timesteps[0], x, noise=noise, eta=0.5)
    assert len(calls) == 1


def test_bad_step_arguments():
    scheduler = DDIMScheduler()
    x, m, noise = tensors()
    with pytest.raises(ValueError, match="call set_timesteps"):
        scheduler.step(m, 999, x)
    scheduler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 998 is not in the schedule"):
        scheduler.step(m, 998, x)
    with pytest.raises(ValueError, match="timestep 5000 is not in the schedule"):
        scheduler.step(m, torch.tensor(5000), x)
    with pytest.raises(TypeError, match="timestep must be an int"):
        scheduler.step(m, 900.0, x)
    with pytest.raises(ValueError, match="timestep must hold one value"):
        scheduler.step(m, scheduler.timesteps[:2], x)
    with pytest.raises(ValueError, match="model_output has shape"):
        scheduler.step(m[:1], 900, x)
    with pytest.raises(TypeError, match="model_output has dtype"):
        scheduler.step(m.half(), 900, x)
    with pytest.raises(ValueError, match="not both"):
        scheduler.step(m, 900, x, noise=noise, generator=torch.Generator(), eta=1.0)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        scheduler.step(m, 900, x, eta=-1.0)
    with genfast.backend("reference"), pytest.raises(ValueError, match="noise has shape"):
        scheduler.step(m, 900, x, noise=noise[:1], eta=1.0)


def test_from_config_skips_bookkeeping_and_sibling_options():
    config = dict(diffusers.DDIMScheduler(steps_offset=1, set_alpha_to_one=False).config)
    config.update(_class_name="PNDMScheduler", _diffusers_version="0.6.0", skip_prk_steps=True)
    ours = DDPMScheduler.from_config(config)  # set_alpha_to_one is DDIM's: ignored by DDPM, as in diffusers
    assert ours.config["steps_offset"] == 1
