"""RealNVP: exact inverse (fp64), log-determinants against autograd's Jacobian, the two-moons density (KS against
held-out points, with an untrained flow as the control that fails), held-out digits bits/dim against a per-pixel
Gaussian, and the recipe's commands."""

import pytest
import torch
from scipy.stats import ks_2samp

import genfast.models
from genfast.data.images import digits
from genfast.data.toy2d import two_moons
from genfast.models.realnvp import RealNVP, RealNVPConfig, dequantize, gaussian_bits_per_dim, squeeze, unsqueeze
from tests.recipe_checks import assert_resume_is_exact

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

CONFIGS = {
    "vector": RealNVPConfig(kind="vector", dim=3, hidden=16, couplings=4),
    "image-1ch": RealNVPConfig(kind="image", image_size=8, channels=1, hidden=8, scales=2),
    "image-3ch": RealNVPConfig(kind="image", image_size=8, channels=3, hidden=8, scales=1),
}


def _perturbed(config: RealNVPConfig) -> RealNVP:
    """A flow in fp64 whose every parameter is moved off its initial value (the couplings start as the identity,
    which would hide a wrong inverse or log-det), actnorm initialised from a batch."""
    torch.manual_seed(0)
    flow = RealNVP(config).double()
    flow(torch.rand(16, *config.data_shape, dtype=torch.float64) * 0.9 + 0.05)  # actnorm's data-dependent init
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return flow.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_inverse_is_exact_in_fp64(name):
    config = CONFIGS[name]
    flow = _perturbed(config)
    x = torch.rand(7, *config.data_shape, dtype=torch.float64) * 0.9 + 0.05
    with torch.no_grad():
        z, _ = flow(x)
        assert z.shape == (7, config.data_dim) and not torch.allclose(z, flow._to_logits(x)[0].flatten(1))
        assert float((flow.inverse(z) - x).abs().max()) <= 1e-5
        if config.kind == "vector":  # the other way round (for images, a random z can saturate the sigmoid)
            z2 = torch.randn_like(z)
            assert float((flow(flow.inverse(z2))[0] - z2).abs().max()) <= 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_log_det_equals_autograds_jacobian(name):
    config = CONFIGS[name]
    flow = _perturbed(config)
    x = torch.rand(2, *config.data_shape, dtype=torch.float64) * 0.9 + 0.05
    with torch.no_grad():
        _, log_det = flow(x)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, *config.data_shape))[0][0], x[b].flatten())
        sign, expected = torch.linalg.slogdet(jac)
        assert float(sign) == 1.0
        # slogdet of an ill-conditioned 64x64 Jacobian is good to ~1e-7 in fp64; a missing or wrong term is O(1)
        assert float(log_det[b]) == pytest.approx(float(expected), abs=1e-6, rel=0)


def test_squeeze_is_a_permutation_and_unsqueeze_its_inverse():
    x = torch.arange(2 * 3 * 4 * 4.0).view(2, 3, 4, 4)
    y = squeeze(x)
    assert y.shape == (2, 12, 2, 2) and torch.equal(y[0, :4, 0, 0], torch.tensor([0.0, 1, 4, 5]))
    assert torch.equal(unsqueeze(y), x)


def _train_on_moons(flow: RealNVP, steps: int) -> None:
    opt = torch.optim.Adam(flow.parameters(), lr=5e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = -flow.log_prob(two_moons(256, generator=g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()


def test_moons_samples_match_held_out_data_and_an_untrained_flow_does_not():
    torch.manual_seed(0)
    held = two_moons(1000, generator=torch.Generator().manual_seed(1))

    def p_values(flow: RealNVP) -> list[float]:
        samples = flow.eval().sample(1000, generator=torch.Generator().manual_seed(2))
        return [ks_2samp(samples[:, d].numpy(), held[:, d].numpy()).pvalue for d in range(2)]

    config = RealNVPConfig(hidden=64, couplings=8)
    control = p_values(RealNVP(config))  # untrained: the identity map, so a standard Gaussian
    assert min(control) < 1e-3, control
    flow = RealNVP(config)
    _train_on_moons(flow, 250)
    assert min(p_values(flow)) > 1e-3


def test_held_out_digits_bits_per_dim_below_a_per_pixel_gaussian():
    torch.manual_seed(0)
    images = digits(8).images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, held = images[order[:1600]], images[order[1600:]]
    g = torch.Generator().manual_seed(0)
    held_x = dequantize(held, 256, generator=g)
    baseline = gaussian_bits_per_dim(dequantize(train, 256, generator=g), held_x, 256)
    flow = RealNVP(RealNVPConfig(kind="image", image_size=8, hidden=16, scales=1))
    opt = torch.optim.Adam(flow.parameters(), lr=2e-3)
    for _ in range(40):
        x = dequantize(train[torch.randint(len(train), (64,), generator=g)], 256, generator=g)
        loss = flow.bits_per_dim(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        bpd = float(flow.eval().bits_per_dim(held_x).mean())
    assert 0 < bpd < baseline, (bpd, baseline)


def test_sample_temperature_zero_is_the_mode_of_z_and_inputs_are_checked():
    flow = _perturbed(CONFIGS["image-1ch"]).float()
    a = flow.sample(2, 0.0)
    assert a.shape == (2, 1, 8, 8) and torch.equal(a[0], a[1]) and float(a.min()) >= 0 and float(a.max()) <= 1
    with pytest.raises(ValueError, match="temperature"):
        flow.sample(2, -1.0)
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        flow.log_prob(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"z must be \[N, 64\]"):
        flow.inverse(torch.zeros(2, 63))
    with pytest.raises(TypeError, match="floating-point"):
        flow.log_prob(torch.zeros(2, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="scales"):
        RealNVPConfig(kind="image", image_size=8, scales=3)


@pytest.mark.parametrize("data", ["moons", "digits"])
def test_train_sample_and_load_from_the_command_line(tmp_path, data, capsys):
    from genfast.recipes.realnvp import sample_main, train_main

    out = tmp_path / "run"
    assert train_main(["--data", data, "--out", str(out), "--steps", "2", "--hidden", "8", "--image-size", "8",
                       "--scales", "1", "--quiet", "--sample-every", "2", "--device", "cpu"]) == 0
    assert ("bits/dim" if data == "digits" else "nats per point") in capsys.readouterr().err
    flow = genfast.models.load(out)
    assert isinstance(flow, RealNVP) and flow.config.kind == ("image" if data == "digits" else "vector")
    png = tmp_path / "s.png"
    assert sample_main(["--ckpt", str(out), "--n", "16", "--temperature", "0.5", "--out", str(png),
                        "--device", "cpu"]) == 0
    assert png.exists()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train_main(["--out", str(tmp_path / "x"), "--image-size", "8", "--scales", "3"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "--scales" in err


def test_resume_continues_exactly(tmp_path):
    from genfast.recipes.realnvp import train_main

    flags = ["--data", "moons", "--hidden", "8", "--couplings", "2", "--quiet", "--sample-every", "100",
             "--device", "cpu", "--steps", "4"]
    assert_resume_is_exact(train_main, flags, tmp_path)
