"""The energy-based model: its fused Langevin sampler against the reference loop, Langevin dynamics against a known
density, and a short contrastive-divergence run on digits."""

import copy
import math

import pytest
import torch

import genfast
from genfast.data.images import digits
from genfast.models.ebm import EBM, EBMConfig
from genfast.ops import _checks, langevin_step, langevin_step_ref
from tests.conftest import backend_params

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = dict(image_size=16, features=8, buffer_size=64)


def reference_chain(model: EBM, x: torch.Tensor, steps: int, generator: torch.Generator) -> torch.Tensor:
    """The sampler written out with the op's reference: the same gradient, clip, Philox seed and clamp per step."""
    c = model.config
    for _ in range(steps):
        grad = model.energy_grad(x).clamp(-c.grad_clip, c.grad_clip)
        seed = _checks.draw_seed(generator, x.device)
        x = langevin_step_ref(x, grad, c.step_size, c.noise_scale, -1.0, 1.0, seed=seed)
    return x


@pytest.mark.parametrize("device,backend", backend_params("langevin_step") + [("cpu", "reference")])
def test_fused_sampler_equals_reference_loop(device, backend):
    torch.manual_seed(0)
    # A large step and noise so that the clamp bites and the noise matters; 16x16 keeps the interpreter quick.
    model = EBM(EBMConfig(**TINY, step_size=2.0, noise_scale=0.3)).to(device)
    twin = copy.deepcopy(model)  # spectral norm updates its vectors on every training-mode forward
    start = torch.rand(5, 1, 16, 16, device=device) * 2 - 1
    with genfast.backend(backend):
        fused = model.langevin(start, 4, generator=torch.Generator(device).manual_seed(7))
    expected = reference_chain(twin, start, 4, torch.Generator(device).manual_seed(7))
    assert fused.shape == start.shape and fused.dtype == start.dtype
    assert float(fused.min()) >= -1 and float(fused.max()) <= 1
    assert (fused.abs() == 1).any(), "the clamp never bit: the test would not see a clamp bug"
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=0)


def test_sampler_noise_changes_with_the_generator_and_repeats_with_it():
    model = EBM(EBMConfig(**TINY)).eval()
    a = model.sample(4, 3, generator=torch.Generator().manual_seed(1))
    b = model.sample(4, 3, generator=torch.Generator().manual_seed(1))
    c = model.sample(4, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_trajectory_has_the_start_and_every_kth_state():
    model = EBM(EBMConfig(**TINY)).eval()
    start = torch.zeros(2, 1, 16, 16)
    final, states = model.langevin(start, 6, generator=torch.Generator().manual_seed(0), trajectory_every=2)
    assert len(states) == 4 and torch.equal(states[0], start) and torch.equal(states[-1], final)


# ----------------------------------------------------------------------------------- Langevin on a known density
RING_RADIUS, RING_WIDTH = 2.0, 0.3


def ring_energy_grad(x: torch.Tensor) -> torch.Tensor:
    """dE/dx for E(x) = (|x| - r)^2 / (2 w^2), the ring density p(x) ∝ exp(-E)."""
    rho = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (rho - RING_RADIUS) / RING_WIDTH ** 2 * x / rho


def ring_radius_cdf(rho: torch.Tensor) -> torch.Tensor:
    """The exact CDF of |x| under the ring density: p(rho) ∝ rho exp(-(rho - r)^2 / 2w^2), integrated numerically."""
    grid = torch.linspace(0, RING_RADIUS + 12 * RING_WIDTH, 200_001, dtype=torch.float64)
    density = grid * torch.exp(-(grid - RING_RADIUS) ** 2 / (2 * RING_WIDTH ** 2))
    cdf = torch.cumulative_trapezoid(density, grid)
    cdf = torch.cat([cdf.new_zeros(1), cdf]) / cdf[-1]
    return torch.from_numpy(__import__("numpy").interp(rho.double().numpy(), grid.numpy(), cdf.numpy()))


def ks_statistic(samples: torch.Tensor, cdf_at_samples: torch.Tensor) -> float:
    n = samples.numel()
    order = torch.argsort(samples)
    cdf = cdf_at_samples[order]
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(ranks / n - cdf, cdf - (ranks - 1) / n).max())


def test_langevin_step_samples_a_ring_density():
    """Unadjusted Langevin with the textbook noise sqrt(2 * step) from the true gradient lands on the density."""
    gen = torch.Generator().manual_seed(0)
    n, step, steps = 20_000, 2e-3, 1500
    x = torch.randn(n, 2, generator=gen) * 2  # isotropic start: the angle is uniform from step 0
    for _ in range(steps):
        x = langevin_step(x, ring_energy_grad(x), step, math.sqrt(2 * step), generator=gen)
    rho = x.double().norm(dim=1)
    # Moments: the mean is the origin; E|x| = r + w^2 / r to second order in w / r (0.045 here).
    assert x.double().mean(0).abs().max() < 0.05
    assert abs(float(rho.mean()) - (RING_RADIUS + RING_WIDTH ** 2 / RING_RADIUS)) < 0.02
    assert abs(float(rho.std()) - RING_WIDTH) < 0.02
    # Kolmogorov-Smirnov on the radius against the exact CDF, and on the angle against the uniform one. The
    # critical value at n = 20000 and alpha = 0.001 is 1.95 / sqrt(n) = 0.0138; the step's O(step) bias is below it.
    assert ks_statistic(rho, ring_radius_cdf(rho)) < 1.95 / math.sqrt(n)
    angle = torch.atan2(x[:, 1], x[:, 0]).double()
    assert ks_statistic(angle, (angle + math.pi) / (2 * math.pi)) < 1.95 / math.sqrt(n)


def test_a_wrong_step_fails_the_ring_test():
    """The statistical test above can fail: twice the right noise gives a visibly wider ring."""
    gen = torch.Generator().manual_seed(0)
    step = 2e-3
    x = torch.randn(5000, 2, generator=gen) * 2
    for _ in range(600):
        x = langevin_step(x, ring_energy_grad(x), step, 2 * math.sqrt(2 * step), generator=gen)
    rho = x.double().norm(dim=1)
    assert ks_statistic(rho, ring_radius_cdf(rho)) > 1.95 / math.sqrt(5000)


# ----------------------------------------------------------------------------------- training on digits
def pixel_histogram_distance(images: torch.Tensor, reference: torch.Tensor, bins: int = 16) -> float:
    """L1 distance between the pixel-value histograms (in [-1, 1]) of two image sets: 0 equal, 2 disjoint."""
    def hist(t):
        h = torch.histc(t.float().clamp(-1, 1), bins=bins, min=-1, max=1)
        return h / h.sum()
    return float((hist(images) - hist(reference)).abs().sum())


def test_contrastive_divergence_on_digits_separates_data_from_noise_and_fills_the_buffer():
    torch.manual_seed(0)
    data = digits(image_size=16).images
    held_out, train = data[:128], data[128:]
    model = EBM(EBMConfig(**TINY | dict(buffer_size=256)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.999))
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(128, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def gap() -> float:
        with torch.no_grad():
            return float(model.energy(noise).mean() - model.energy(held_out).mean())

    gap_before = gap()
    for _ in range(60):
        batch = train[torch.randint(len(train), (32,), generator=gen)]
        loss, stats = model.contrastive_divergence(batch, 10, generator=gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert set(stats) == {"e_pos", "e_neg"} and all(torch.isfinite(v) for v in stats.values())
    gap_after = gap()
    assert gap_after > gap_before + 0.3, (gap_before, gap_after)  # held-out digits now lower in energy than noise
    # The chains moved the buffer from uniform noise towards the digits' pixel statistics (mostly dark background).
    buffer_distance = pixel_histogram_distance(model.replay, held_out)
    noise_distance = pixel_histogram_distance(noise, held_out)
    assert buffer_distance < 0.5 * noise_distance, (buffer_distance, noise_distance)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="image_size"):
        EBMConfig(image_size=20)
    with pytest.raises(ValueError, match="features"):
        EBMConfig.from_dict({"features": 10**9})
    with pytest.raises(ValueError, match="reinit_fraction"):
        EBMConfig(reinit_fraction=1.5)
    model = EBM(EBMConfig(**TINY))
    with pytest.raises(ValueError, match="shape"):
        model.energy(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="steps"):
        model.langevin(torch.zeros(1, 1, 16, 16), -1)
    with pytest.raises(ValueError, match="buffer_size"):
        model.sample(65, 1)


# ----------------------------------------------------------------------------------- the recipe
def read_png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


RECIPE_TINY = ["--device", "cpu", "--quiet", "--image-size", "16", "--features", "8", "--buffer-size", "32",
               "--batch-size", "8", "--langevin-steps", "3", "--sample-steps", "2", "--n-samples", "4",
               "--sample-every", "2"]


def test_recipe_resume_is_bitwise_and_writes_the_grids(tmp_path):
    from genfast.recipes import ebm as recipe
    from genfast.training import load_safetensors_state

    whole, split = tmp_path / "whole", tmp_path / "split"
    assert recipe.train_main(["--steps", "4", "--out", str(whole), *RECIPE_TINY]) == 0
    assert recipe.train_main(["--steps", "4", "--stop-after", "2", "--out", str(split), *RECIPE_TINY]) == 0
    assert recipe.train_main(["--steps", "4", "--resume", "--out", str(split), *RECIPE_TINY]) == 0
    a = load_safetensors_state(whole / "checkpoint" / "model.safetensors")
    b = load_safetensors_state(split / "checkpoint" / "model.safetensors")
    assert "replay" in a and a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"
    names = {p.name for p in (whole / "samples").iterdir()}
    assert {"buffer_000002.png", "chains_000002.png", "buffer_final.png", "chains_final.png"} <= names
    model = EBM.from_checkpoint(whole)
    assert torch.equal(model.replay, a["replay"])


def test_recipe_sample_grid_and_chain_rows(tmp_path, capsys):
    from genfast.recipes import ebm as recipe

    run = tmp_path / "run"
    assert recipe.train_main(["--steps", "1", "--out", str(run), *RECIPE_TINY]) == 0
    grid, chain = tmp_path / "grid.png", tmp_path / "chain.png"
    assert recipe.sample_main(["--ckpt", str(run), "--n", "4", "--steps", "2", "--out", str(grid)]) == 0
    assert recipe.sample_main(["--ckpt", str(run), "--n", "3", "--steps", "20", "--chain", "--scale", "1",
                               "--start", "noise", "--out", str(chain)]) == 0
    err = capsys.readouterr().err
    assert "each row one chain from uniform noise" in err
    # 3 chains x (start + 10 states) of 16x16 images, 2-pixel padding: 11 columns, 3 rows.
    assert read_png_size(chain) == (2 + 11 * 18, 2 + 3 * 18)


@pytest.mark.parametrize("argv,needle", [
    (["--langevin-steps", "0"], "--langevin-steps"),
    (["--image-size", "20"], "--image-size"),
    (["--alpha", "-1"], "--alpha"),
    (["--batch-size", "64"], "--buffer-size"),
    (["--data", "/no/such/folder"], "--data"),
])
def test_recipe_bad_arguments_are_usage_errors(tmp_path, capsys, argv, needle):
    from genfast.recipes import ebm as recipe

    with pytest.raises(SystemExit) as exit_info:
        recipe.train_main(["--out", str(tmp_path / "run"), *RECIPE_TINY, *argv])
    assert exit_info.value.code == 2
    assert needle in capsys.readouterr().err


def test_sample_refuses_another_models_run(tmp_path, capsys):
    from genfast.recipes import ebm as recipe

    with pytest.raises(SystemExit) as exit_info:
        recipe.sample_main(["--ckpt", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2 and "--ckpt" in capsys.readouterr().err


def test_cli_knows_ebm_and_models_load_reads_its_run(tmp_path):
    import genfast.models
    from genfast import cli

    run = tmp_path / "run"
    assert cli.main(["train", "ebm", "--steps", "1", "--out", str(run), *RECIPE_TINY]) == 0
    model = genfast.models.load(run)
    assert isinstance(model, EBM) and not model.training
