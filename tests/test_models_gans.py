"""The GANs (genfast/models/numbergan.py, dcgan.py, cgan.py) and their recipes (genfast train/sample ...).

Measures used:
- number-pattern GAN: the fraction of sampled integers that are multiples of 5 (>= 90% after training);
- DCGAN / cGAN "moving toward the data": MMD^2 with a Gaussian kernel between 4x4-average-pooled generated and
  real images (bandwidth: the median squared distance between real images), generator in eval mode, the same
  latents before and after training; a short run must divide it by at least 2 (2.5 for the cGAN);
- cGAN diversity and class fidelity: the within/between-class mean pairwise distance ratio, and the fraction of
  samples drawn in their class's colour.
Everything runs on one thread: on a loaded 2-core machine that is several times faster for these small models.
"""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import genfast
from genfast.cli import main as cli_main
from genfast.data.images import digits, shapes
from genfast.models import cgan, dcgan, numbergan
from genfast.recipes import cgan as cgan_recipe
from genfast.recipes import dcgan as dcgan_recipe
from genfast.training import INTERRUPTED_EXIT, load_checkpoint, load_safetensors_state, seed_everything
from genfast.training import loop as training_loop
from tests.conftest import DEVICES, serving_backends

TINY = ["--device", "cpu", "--g-features", "8", "--d-features", "8", "--latent-dim", "8", "--batch-size", "8",
        "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Biased MMD^2 between two image batches, Gaussian kernel on 4x4-average-pooled pixels."""
    x, y = F.avg_pool2d(x.float(), 4).flatten(1), F.avg_pool2d(y.float(), 4).flatten(1)
    d_yy = torch.cdist(y, y) ** 2
    bandwidth = d_yy[d_yy > 0].median()

    def k(a, b):
        return torch.exp(-torch.cdist(a, b) ** 2 / bandwidth).mean()

    return float(k(x, x) + k(y, y) - 2 * k(x, y))


# ------------------------------------------------------------------------------------------- number GAN
@pytest.mark.slow
def test_numbergan_learns_multiples_of_5():
    seed_everything(0)
    config = numbergan.NumberGANConfig()
    G, D = numbergan.Generator(config), numbergan.Discriminator(config)
    opt_g = torch.optim.Adam(G.parameters(), 1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), 1e-3, betas=(0.5, 0.999))
    eval_gen = torch.Generator()

    def sample():
        return G.sample(1000, generator=eval_gen.manual_seed(1))

    before = numbergan.multiple_fraction(sample())
    assert before < 0.35  # about 1/5 for an untrained generator: the test can fail
    stopper = numbergan.EarlyStopping(target=0.02, patience=50)
    data = torch.Generator().manual_seed(0)
    for step in range(1, 1501):
        real = D.one_hot(numbergan.real_sequences(64, config, data))
        fake = numbergan.straight_through_gumbel(G(G.latent(64)), config.tau)
        loss_d = (F.binary_cross_entropy_with_logits(D(real), torch.ones(64))
                  + F.binary_cross_entropy_with_logits(D(fake.detach()), torch.zeros(64)))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = F.binary_cross_entropy_with_logits(D(fake), torch.ones(64))
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        if step % 50 == 0 and stopper.update(numbergan.mean_squared_remainder(sample())):
            break
    assert step < 1500, "early stopping never fired"
    samples = sample()
    assert numbergan.multiple_fraction(samples) >= 0.9
    assert numbergan.mean_squared_remainder(samples) <= 0.1
    assert samples.min() >= 0 and samples.max() < 100
    assert samples.unique().numel() >= 5  # not collapsed onto a single integer


def test_numbergan_measures_and_relaxation():
    x = torch.tensor([[0, 5, 7, 99]])
    assert numbergan.mean_squared_remainder(x) == pytest.approx((0 + 0 + 4 + 16) / 4)
    assert numbergan.multiple_fraction(x) == 0.5
    with pytest.raises(ValueError, match="integers"):
        numbergan.mean_squared_remainder(torch.tensor([1.0]))
    logits = torch.randn(3, 4, 7, requires_grad=True)
    u = torch.rand(3, 4, 7)
    y = numbergan.straight_through_gumbel(logits, 0.5, u)
    gumbel = -torch.log(-torch.log(u))
    assert torch.equal(y.detach(), F.one_hot((logits + gumbel).argmax(-1), 7).float())  # forward: exact one-hot
    w = torch.randn(3, 4, 7)
    (y * w).sum().backward()
    leaf = logits.detach().clone().requires_grad_()
    (F.softmax((leaf + gumbel) / 0.5, -1) * w).sum().backward()
    torch.testing.assert_close(logits.grad, leaf.grad)  # backward: the Gumbel-softmax gradient
    with pytest.raises(ValueError, match="tau"):
        numbergan.NumberGANConfig(tau=0.0)
    stopper = numbergan.EarlyStopping(target=0.0, patience=2)
    assert [stopper.update(v) for v in (1.0, 0.5, 0.7, 0.6)] == [False, False, False, True]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_numbergan_sampling_backends_agree(backend):
    if backend not in serving_backends("sample_tokens", "cpu"):
        pytest.skip(f"{backend} does not serve sample_tokens here")
    torch.manual_seed(0)
    G = numbergan.Generator(numbergan.NumberGANConfig(hidden=32)).eval()
    noise = torch.rand(6 * 10, 100, generator=torch.Generator().manual_seed(3))
    out = {}
    for name in ("reference", backend):
        with genfast.backend(name):
            out[name] = G.sample(6, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(2), noise=noise)
    assert torch.equal(out["reference"], out[backend])
    assert out[backend].shape == (6, 10)


# ------------------------------------------------------------------------------------------- reference vs fused
def _tiny(kind, device="cpu"):
    if kind == "dcgan":
        config = dcgan.DCGANConfig(image_size=32, channels=1, latent_dim=8, g_features=4, d_features=4)
        return dcgan.Generator(config).to(device), dcgan.Discriminator(config).to(device), ()
    config = cgan.CGANConfig(num_classes=3, image_size=32, channels=3, latent_dim=8, embed_dim=4, g_features=4,
                             d_features=4, class_names=("a", "b", "c"))
    return (cgan.Generator(config).to(device), cgan.Discriminator(config).to(device),
            (torch.tensor([0, 2], device=device),))


def _step(G, D, z, extra):
    """One generator update's gradients, and the generator's outputs in train and eval mode."""
    train_out = G.train()(z, *extra)
    loss = F.binary_cross_entropy_with_logits(D(train_out, *extra), torch.ones(z.shape[0], device=z.device))
    grads = torch.autograd.grad(loss, list(G.parameters()))
    with torch.no_grad():
        eval_out = G.eval()(z, *extra)
        d_out = D(eval_out, *extra)
    return train_out.detach(), eval_out, d_out, grads, [b.clone() for b in G.buffers()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["dcgan", "cgan"])
def test_reference_and_fused_backends_agree(kind, device):
    if "triton" not in serving_backends("conv_transpose2d", device):
        pytest.skip(f"Triton does not serve conv_transpose2d on {device} here")
    torch.manual_seed(0)
    G, D, extra = _tiny(kind, device)
    state_g, state_d = copy.deepcopy(G.state_dict()), copy.deepcopy(D.state_dict())  # not live views
    z = torch.randn(2, 8, device=device)
    results = {}
    for name in ("reference", "triton"):
        G.load_state_dict(state_g)  # the same weights and running statistics for both
        D.load_state_dict(state_d)
        with genfast.backend(name):
            results[name] = _step(G, D, z, extra)
    ref, fused = results["reference"], results["triton"]
    tol = dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fused[0], ref[0], **tol)  # train mode (batch statistics)
    torch.testing.assert_close(fused[1], ref[1], **tol)  # eval mode (norm folded into the kernel)
    torch.testing.assert_close(fused[2], ref[2], **tol)  # discriminator on those images
    for gf, gr in zip(fused[3], ref[3]):
        torch.testing.assert_close(gf, gr, **tol)
    for bf, br in zip(fused[4], ref[4]):  # BatchNorm running statistics updated alike
        torch.testing.assert_close(bf, br, **tol)
    assert ref[1].abs().max() <= 1 and ref[1].shape[2:] == (32, 32)


# ------------------------------------------------------------------------------------------- models
def test_dcgan_shapes_and_init():
    for size, channels in ((32, 1), (64, 3)):
        config = dcgan.DCGANConfig(image_size=size, channels=channels, latent_dim=16, g_features=8, d_features=8)
        G, D = dcgan.Generator(config), dcgan.Discriminator(config)
        x = G(G.latent(3))
        assert x.shape == (3, channels, size, size) and D(x).shape == (3,)
        assert isinstance(G.net[-1], genfast.nn.ConvTranspose2dNormAct) and G.net[-1].norm is None
        weights = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)])
        assert abs(float(weights.detach().std()) - 0.02) < 0.002
    with pytest.raises(ValueError, match="image_size"):
        dcgan.DCGANConfig(image_size=48)
    with pytest.raises(ValueError, match="z must be"):
        G(torch.randn(2, 5))


def test_cgan_labels_and_interpolation():
    G, D, _ = _tiny("cgan")
    assert G.label_index("b") == 1 and G.label_index(2) == 2 and G.label_index("0") == 0
    for bad in ("d", 3, -1, "x y"):
        with pytest.raises(ValueError, match="known: 'a', 'b', 'c'"):
            G.label_index(bad)
    with pytest.raises(TypeError, match="label"):
        G.label_index(1.5)
    assert G.eval().generate("c", 2).shape == (2, 3, 32, 32)
    z0, z1 = torch.randn(2, 8), torch.randn(2, 8)
    for mode in ("linear", "slerp"):
        path = cgan.interpolate(z0, z1, 5, mode)
        assert path.shape == (5, 2, 8)
        torch.testing.assert_close(path[0], z0)
        torch.testing.assert_close(path[-1], z1)
    slerp = cgan.interpolate(z0, z1, 5, "slerp")
    norms = (1 - torch.linspace(0, 1, 5))[:, None] * z0.norm(dim=1) + torch.linspace(0, 1, 5)[:, None] * z1.norm(dim=1)
    torch.testing.assert_close(slerp.norm(dim=-1), norms)  # the norm is interpolated, the direction rotates
    u = torch.tensor([1.0, 0.0])
    torch.testing.assert_close(cgan.interpolate(u, torch.tensor([0.0, 1.0]), 3)[1], torch.tensor([0.5**0.5] * 2))
    with pytest.raises(ValueError, match="mode"):
        cgan.interpolate(z0, z1, 3, "cubic")


# ------------------------------------------------------------------------------------------- recipes
def _initial_generator(module, config):
    seed_everything(0)  # what start_run does before the recipe builds its models
    return module.Generator(config)


def test_dcgan_short_run_moves_toward_the_data(tmp_path):
    out = tmp_path / "run"
    args = ["--steps", "80", "--lr", "1e-3", "--g-features", "16", "--d-features", "16", "--latent-dim", "16",
            "--batch-size", "32", "--quiet", "--out", str(out), "--sample-every", "40", "--device", "cpu"]
    assert dcgan_recipe.train_main(args) == 0
    config = dcgan.DCGANConfig(32, 1, 16, 16, 16)
    before = _initial_generator(dcgan, config).eval()
    after = dcgan.Generator(config)
    load_checkpoint(out, modules={"generator": after})
    after.eval()
    real = digits(32, 1).images[:512]
    z = before.latent(512, torch.Generator().manual_seed(1))
    with torch.no_grad():
        fake_before, fake_after = before(z), after(z)
    assert torch.isfinite(fake_after).all()
    assert mmd2(fake_after, real) < mmd2(fake_before, real) / 2
    for name in ("step_000040.png", "final.png"):
        assert (out / "samples" / name).is_file()


def within_between_ratio(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean pairwise L2 distance between images of the same class over that between images of different classes:
    about 0.85 for the shapes data (position and size vary within a class), near 0 when a generator draws one
    image per class, and near 1 when it ignores the class."""
    x = images.flatten(1).double()
    d = torch.cdist(x, x)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    different = labels[:, None] != labels[None, :]
    return float(d[same].mean() / d[different].mean())


def colour_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of shapes images whose foreground (pixels far from the background) is nearest, on average, to
    their class's colour (label % 3 in shapes()' order): 1.0 for the data."""
    from genfast.data.images import COLORS

    palette = torch.tensor(list(COLORS.values())) * 2 - 1
    background = torch.tensor((0.95, 0.95, 0.92)) * 2 - 1
    x = images.float().permute(0, 2, 3, 1)
    foreground = (x - background).norm(dim=-1) > 0.5
    mean = (x * foreground[..., None]).sum((1, 2)) / foreground.sum((1, 2)).clamp_min(1)[:, None]
    return float((torch.cdist(mean, palette).argmin(1) == labels % 3).float().mean())


@pytest.mark.slow
def test_cgan_short_run_learns_each_class_without_collapse(tmp_path):
    """100 steps of a small cGAN with the recipe's defaults (projection discriminator, mode-seeking weight 0.2):
    - it moves toward the data: mmd2 0.10x the initial one here (the bound, 0.4x, failed before those defaults:
      0.66x);
    - samples of one class differ: the within/between-class distance ratio was 0.72 here (data 0.85; 0.43 before,
      a generator drawing one image per class; the bound is 0.6);
    - each class has its colour: 92% of the samples on the machine these defaults were tuned on, 79% on a later
      CI machine (the same code: its CPU's kernels round differently, and 100 steps amplify that); 37% before
      those defaults. The bound, 70%, still fails that collapse and a generator that escapes collapse by
      ignoring the class (the mode-seeking term alone at weight 1: ratio 0.93, colour 58%)."""
    out = tmp_path / "run"
    args = ["--steps", "100", "--lr", "1e-3", "--g-features", "16", "--d-features", "16", "--latent-dim", "16",
            "--embed-dim", "8", "--batch-size", "32", "--quiet", "--out", str(out), "--sample-every", "1000",
            "--device", "cpu"]
    assert cgan_recipe.train_main(args) == 0
    data = shapes(2048, 32, 3, seed=0)
    config = cgan.CGANConfig(9, 32, 3, 16, 8, 16, 16, data.class_names)
    before = _initial_generator(cgan, config).eval()
    after = cgan.Generator(config)
    load_checkpoint(out, modules={"generator": after})
    after.eval()
    labels = data.labels[:512]
    z = before.latent(512, torch.Generator().manual_seed(1))
    with torch.no_grad():
        fake_before, fake_after = before(z, labels), after(z, labels)
    assert torch.isfinite(fake_after).all()
    assert mmd2(fake_after, data.images[:512]) < 0.4 * mmd2(fake_before, data.images[:512])
    grid_labels = torch.arange(9).repeat_interleave(16)
    with torch.no_grad():
        grid = after(after.latent(len(grid_labels), torch.Generator().manual_seed(2)), grid_labels)
    assert within_between_ratio(grid, grid_labels) > 0.6
    assert colour_accuracy(grid, grid_labels) > 0.7
    assert within_between_ratio(data.images[:512], labels) > 0.8 and colour_accuracy(data.images[:512], labels) == 1


def test_mode_seeking_penalty():
    """1 / (mean over same-class pairs of |dx| / |dz|): large for one image per class, 0 without any pair."""
    from genfast.recipes._gan import mode_seeking_penalty

    z = torch.randn(6, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    images = torch.randn(6, 3, 2, 2)
    x, zf = images.flatten(1), z
    pairs = [(0, 1), (1, 0), (2, 3), (3, 2), (4, 5), (5, 4)]
    ratio = sum(float((x[i] - x[j]).abs().mean() / (zf[i] - zf[j]).abs().mean()) for i, j in pairs) / len(pairs)
    assert mode_seeking_penalty(images, z, labels).item() == pytest.approx(1 / (ratio + 1e-5), rel=1e-5)
    collapsed = images[[0, 0, 2, 2, 4, 4]]
    assert mode_seeking_penalty(collapsed, z, labels).item() == pytest.approx(1e5, rel=1e-3)
    assert mode_seeking_penalty(images, z, torch.arange(6)).item() == 0


def test_sample_grids_are_png(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    out = tmp_path / "run"
    assert cgan_recipe.train_main(["--steps", "2", *TINY, "--embed-dim", "4", "--out", str(out),
                                   "--n-samples", "18"]) == 0
    with Image.open(out / "samples" / "final.png") as im:
        im.load()
        # 9 classes x 2 columns of 32x32, the training grid enlarged 2x (Run.save_grid: small images are scaled up)
        assert im.mode == "RGB" and im.size == (2 * (2 + 2 * 34), 2 * (2 + 9 * 34))
    assert cli_main(["sample", "cgan", "--ckpt", str(out), "--label", "blue square", "--n", "5",
                     "--out", str(tmp_path / "blue.png")]) == 0
    assert cli_main(["sample", "cgan", "--ckpt", str(out), "--interpolate", "--steps", "4", "--n", "2",
                     "--out", str(tmp_path / "walk.png")]) == 0
    with Image.open(tmp_path / "walk.png") as im:
        im.load()
        assert im.size == (2 + 4 * 34, 2 + 2 * 34)
    with Image.open(tmp_path / "blue.png") as im:
        im.load()
        assert im.mode == "RGB"


@pytest.mark.parametrize("recipe", ["dcgan", "numbergan"])
def test_resume_equals_uninterrupted(tmp_path, recipe):
    from genfast.recipes import numbergan as numbergan_recipe

    module = dcgan_recipe if recipe == "dcgan" else numbergan_recipe
    extra = TINY if recipe == "dcgan" else ["--device", "cpu", "--hidden", "16", "--latent-dim", "8", "--batch-size",
                                            "8", "--quiet", "--sample-every", "2", "--eval-samples", "16",
                                            "--target", "0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert module.train_main(["--steps", "6", "--out", str(whole), *extra]) == 0
    assert module.train_main(["--steps", "3", "--out", str(split), *extra]) == 0
    assert module.train_main(["--steps", "6", "--out", str(split), "--resume", *extra]) == 0
    for name in ("generator", "discriminator"):
        a = load_safetensors_state(whole / "checkpoint" / f"{name}.safetensors")
        b = load_safetensors_state(split / "checkpoint" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}.{key} differs after resume"
    trainer_whole, _ = load_checkpoint(whole)
    trainer_split, _ = load_checkpoint(split)
    assert trainer_whole["step"] == trainer_split["step"] == 6


def test_ctrl_c_saves_a_checkpoint(tmp_path, monkeypatch):
    class InterruptedAfterTwoSteps:
        def __init__(self):
            self.checks = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        @property
        def requested(self):
            self.checks += 1
            return self.checks >= 2

    monkeypatch.setattr(training_loop, "StopOnInterrupt", InterruptedAfterTwoSteps)
    out = tmp_path / "run"
    assert dcgan_recipe.train_main(["--steps", "50", "--out", str(out), *TINY]) == INTERRUPTED_EXIT
    trainer, config = load_checkpoint(out)
    assert trainer["step"] == 2 and config["recipe"] == "dcgan"
    assert (out / "samples" / "final.png").is_file()


def test_cli_smoke(tmp_path, capsys):
    out = tmp_path / "dc"
    assert cli_main(["train", "dcgan", "--steps", "2", "--out", str(out), "--image-size", "64", *TINY]) == 0
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["model"]["image_size"] == 64 and config["model"]["channels"] == 1
    grid = tmp_path / "grid.png"
    assert cli_main(["sample", "dcgan", "--ckpt", str(out), "--n", "4", "--out", str(grid)]) == 0
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ng = tmp_path / "ng"
    assert cli_main(["train", "numbergan", "--steps", "2", "--out", str(ng), "--hidden", "16", "--quiet",
                    "--device", "cpu"]) == 0
    capsys.readouterr()
    assert cli_main(["sample", "numbergan", "--ckpt", str(ng), "--n", "3", "--temperature", "0"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 3 and all(len(r.split()) == 10 for r in rows)
    with pytest.raises(SystemExit):  # a dcgan checkpoint is not a cgan one
        cli_main(["sample", "cgan", "--ckpt", str(out)])
    assert "not a cgan one" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- bad input
def _expect_cli_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_input_gets_clear_errors(tmp_path, capsys):
    Image = pytest.importorskip("PIL.Image")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_cli_error(capsys, ["train", "dcgan", "--data", str(empty), "--out", str(tmp_path / "o")], "no images")
    _expect_cli_error(capsys, ["train", "dcgan", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                      "is not a folder")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png at all")
    _expect_cli_error(capsys, ["train", "dcgan", "--data", str(broken), "--out", str(tmp_path / "o")],
                      "cannot read image")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (10, 10)).save(mixed / "a.png")
    Image.new("RGB", (12, 8)).save(mixed / "b.png")
    from genfast.data.images import image_folder

    with pytest.raises(ValueError, match="is 12x8 but .* is 10x10"):
        image_folder(mixed)
    # The conditional GAN needs labels: a flat folder has none.
    _expect_cli_error(capsys, ["train", "cgan", "--data", str(mixed), "--out", str(tmp_path / "o")],
                      "needs labelled images")
    _expect_cli_error(capsys, ["train", "dcgan", "--image-size", "48"], "invalid choice")
    _expect_cli_error(capsys, ["train", "dcgan", "--resume", "--out", str(tmp_path / "nothing")], "no checkpoint")
    _expect_cli_error(capsys, ["sample", "dcgan", "--ckpt", str(tmp_path / "nothing")], "no checkpoint")
    run = tmp_path / "c"
    assert cgan_recipe.train_main(["--steps", "1", *TINY, "--embed-dim", "4", "--out", str(run)]) == 0
    _expect_cli_error(capsys, ["sample", "cgan", "--ckpt", str(run), "--label", "purple circle"],
                      "unknown class label 'purple circle'; known: 'red circle'")
    _expect_cli_error(capsys, ["sample", "cgan", "--ckpt", str(run), "--label", "9"], "class index 9 is out of range")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["cgan", "numbergan"])  # dcgan runs the same loop as cgan
def test_ddp_through_torchrun(tmp_path, recipe):
    """Two CPU processes (gloo) under torchrun: the run completes and rank 0 writes the checkpoint (the labels are
    sharded with the images; numbergan evaluates and decides on early stopping on every rank)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    extra = TINY if recipe != "numbergan" else ["--device", "cpu", "--hidden", "16", "--batch-size", "8", "--quiet",
                                                "--sample-every", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a free port of its own (the default, 29500, is taken while another torchrun test runs beside it).
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                    "genfast", "train", recipe, "--steps", "3", "--device", "cpu", "--out", str(out), *extra],
                   check=True, env=env, timeout=300, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    trainer, config = load_checkpoint(out)
    assert trainer["step"] == 3 and config["recipe"] == recipe
