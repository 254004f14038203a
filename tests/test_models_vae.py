"""The convolutional VAE (genfast/models/vae.py) and its recipe (genfast train/sample vae).

- It learns: 150 Adam steps on scikit-learn's digits at 16x16 bring the per-pixel mean squared error of the
  reconstructions decode(mu(x)) (images in [-1, 1]) below 0.06, where predicting the mean digit scores 0.176.
- Latent arithmetic and interpolation: shapes, range [-1, 1], and their definitions (endpoints are the
  reconstructions, scale 0 adds nothing, the vector is the difference of mean encodings).
- The reference backend and the fused one (Triton, in its interpreter on CPU) agree for equal weights and noise, in
  train mode (BatchNorm batch statistics after the kernel) and eval mode (BatchNorm folded into the kernel), and
  in every gradient.
- The recipe: a few steps into tmp_path, every sample mode writes a valid PNG, resume equals an uninterrupted run
  bit for bit, bad input gets a clear error.
"""

import pytest
import torch

import genfast
from genfast.models.vae import VAE, VAEConfig, vae_loss
from genfast.recipes import vae as recipe

TINY = VAEConfig(image_size=8, channels=1, latent_dim=4, base_channels=4)
# Two decoder blocks: ConvTranspose + BatchNorm + LeakyReLU (folded in eval mode), then ConvTranspose + tanh.
TINY16 = VAEConfig(image_size=16, channels=1, latent_dim=4, base_channels=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _trained_vae_on_digits(steps: int):
    from genfast.data.images import digits

    pytest.importorskip("sklearn")
    data = digits(16, 1).images
    torch.manual_seed(0)
    model = VAE(VAEConfig(image_size=16, channels=1, latent_dim=8, base_channels=16))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = data[torch.randint(len(data), (64,), generator=g)]
        losses = model.loss(batch, generator=g)
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        assert torch.isfinite(losses["loss"])
    return model.eval(), data


def test_vae_learns_digits():
    model, data = _trained_vae_on_digits(150)
    with torch.no_grad():
        recon = model.reconstruct(data[:512])
        mse = (recon - data[:512]).square().mean().item()
        mean_image_mse = (data - data.mean(0)).square().mean().item()
    assert mean_image_mse > 0.15
    print(f"digits 16x16, 150 steps: reconstruction MSE per pixel {mse:.4f}")
    assert mse < 0.06, f"reconstruction MSE per pixel {mse:.4f} (mean-image baseline {mean_image_mse:.4f})"


def test_latent_arithmetic_and_interpolation():
    torch.manual_seed(1)
    model = VAE(VAEConfig(image_size=16, channels=3, latent_dim=6, base_channels=4)).eval()
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        frames = model.interpolate(x[0], x[1], steps=7)
        assert frames.shape == (7, 3, 16, 16)
        assert frames.min() >= -1 and frames.max() <= 1
        torch.testing.assert_close(frames[0], model.reconstruct(x[:1])[0])
        torch.testing.assert_close(frames[-1], model.reconstruct(x[1:2])[0])
        batched = model.interpolate(x[:2], x[2:4], steps=3)
        assert batched.shape == (2, 3, 3, 16, 16)
        torch.testing.assert_close(batched[1, 2], model.reconstruct(x[3:4])[0])

        vector = model.attribute_vector(x[:2], x[2:5])
        assert vector.shape == (6,)
        torch.testing.assert_close(vector, model.encode(x[:2])[0].mean(0) - model.encode(x[2:5])[0].mean(0))
        edited = model.add_attribute(x, vector, scale=1.0)
        assert edited.shape == x.shape and edited.min() >= -1 and edited.max() <= 1
        torch.testing.assert_close(edited, model.decode(model.encode(x)[0] + vector))
        torch.testing.assert_close(model.add_attribute(x, vector, scale=0.0), model.reconstruct(x))
        torch.testing.assert_close(model.add_attribute(x, vector, scale=-2.0),
                                   model.decode(model.encode(x)[0] - 2 * vector))

        s1 = model.sample(4, generator=torch.Generator().manual_seed(3))
        s2 = model.sample(4, generator=torch.Generator().manual_seed(3))
        assert s1.shape == (4, 3, 16, 16) and torch.equal(s1, s2) and s1.abs().max() <= 1


def test_loss_definition():
    torch.manual_seed(2)
    model = VAE(TINY)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    noise = torch.randn(3, 4)
    recon, mu, logvar = model(x, noise=noise)
    losses = model.loss(x, noise=noise)
    sse = (recon - x).square().sum(dim=(1, 2, 3)).mean()
    kl = (-0.5 * (1 + logvar - mu.square() - logvar.exp())).sum(1).mean()
    torch.testing.assert_close(losses["recon"], sse)
    torch.testing.assert_close(losses["kl"], kl)
    torch.testing.assert_close(losses["loss"], sse + kl)
    beta = vae_loss(x, recon, mu, logvar, beta=0.25)
    torch.testing.assert_close(beta["loss"], sse + 0.25 * kl)


def _run(model, x, noise, train):
    model.train(train)
    model.zero_grad()
    recon, mu, logvar = model(x, noise=noise)
    vae_loss(x, recon, mu, logvar)["loss"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return recon.detach(), grads


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_reference_and_fused_agree(train):
    torch.manual_seed(3)
    model = VAE(TINY16)
    for m in model.modules():  # non-trivial running statistics, so eval mode folds something real
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    noise = torch.randn(2, 4)
    with genfast.backend("reference"):
        ref_out, ref_grads = _run(model, x, noise, train)
    model.load_state_dict(state)
    with genfast.backend("triton"):
        out, grads = _run(model, x, noise, train)
        # The same noise drawn by each backend's kernel from the same generator state.
        model.eval()
        z_fused = genfast.ops.reparameterize(*model.encode(x), generator=torch.Generator().manual_seed(5))
    with genfast.backend("reference"):
        z_ref = genfast.ops.reparameterize(*model.encode(x), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(z_fused.detach(), z_ref.detach(), atol=1e-6, rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        VAEConfig(image_size=24)
    with pytest.raises(ValueError, match="channels"):
        VAEConfig(channels=2)
    model = VAE(TINY)
    with pytest.raises(ValueError, match="x must be"):
        model.encode(torch.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="z must be"):
        model.decode(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="steps"):
        model.interpolate(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), steps=1)
    with pytest.raises(ValueError, match="one shape"):
        model.interpolate(torch.zeros(1, 8, 8), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="n must be"):
        model.sample(0)
    with pytest.raises(ValueError, match="vector"):
        model.add_attribute(torch.zeros(1, 1, 8, 8), torch.zeros(3))


# ------------------------------------------------------------------------------------------------- recipe
TRAIN_ARGS = ["--image-size", "8", "--latent-dim", "4", "--base-channels", "4", "--batch-size", "8", "--quiet",
              "--device", "cpu"]


def _png_ok(path, size=None):
    Image = pytest.importorskip("PIL.Image")
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        if size is not None:
            assert im.size == size
        return im.size


def test_cli_train_and_sample(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "run"
    assert recipe.train_main(["--steps", "3", "--out", str(out), "--sample-every", "2", *TRAIN_ARGS]) == 0
    assert (out / "checkpoint" / "model.safetensors").is_file()
    _png_ok(out / "samples" / "step_000002.png")
    _png_ok(out / "samples" / "final.png")
    _png_ok(out / "samples" / "reconstructions.png")
    for mode in ("prior", "reconstruct", "interpolate", "arithmetic"):
        path = tmp_path / f"{mode}.png"
        assert recipe.sample_main(["--ckpt", str(out), "--mode", mode, "--n", "4", "--steps", "3", "--out",
                                   str(path), "--device", "cpu"]) == 0
        width, height = _png_ok(path)
        assert width > 8 and height > 8
    # prior: 4 images of 8x8 in a 2x2 grid with 2-pixel padding -> 22x22
    assert _png_ok(tmp_path / "prior.png") == (22, 22)
    # arithmetic on digits with named classes
    assert recipe.sample_main(["--ckpt", str(out / "checkpoint"), "--mode", "arithmetic", "--attribute-with", "7",
                               "--attribute-without", "1", "--out", str(tmp_path / "a71.png"), "--device",
                               "cpu"]) == 0
    _png_ok(tmp_path / "a71.png", (2 + 8 * 10, 2 + 6 * 10))


def test_cli_bad_input(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        recipe.train_main(["--data", str(empty), "--out", str(tmp_path / "x"), *TRAIN_ARGS])
    err = capsys.readouterr().err
    assert "--data" in err and "no images" in err
    with pytest.raises(SystemExit):
        recipe.train_main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), *TRAIN_ARGS])
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.train_main(["--image-size", "12", "--out", str(tmp_path / "x"), "--quiet"])
    assert "power of two" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.train_main(["--resume", "--out", str(tmp_path / "nothing"), *TRAIN_ARGS])
    assert "no checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.sample_main(["--ckpt", str(tmp_path / "nothing"), "--mode", "prior"])
    assert "no checkpoint at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        recipe.sample_main(["--ckpt", str(tmp_path), "--mode", "dream"])
    assert "invalid choice: 'dream'" in capsys.readouterr().err


def test_cli_bad_class_label(tmp_path, capsys):
    out = tmp_path / "run"
    assert recipe.train_main(["--data", "shapes", "--steps", "1", "--out", str(out), *TRAIN_ARGS]) == 0
    with pytest.raises(SystemExit):
        recipe.sample_main(["--ckpt", str(out), "--mode", "arithmetic", "--attribute-with", "purple", "--out",
                            str(tmp_path / "x.png"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert "unknown class 'purple'" in err and "red circle" in err
    # shapes' default arithmetic: red minus blue
    assert recipe.sample_main(["--ckpt", str(out), "--mode", "arithmetic", "--out", str(tmp_path / "rb.png"),
                               "--device", "cpu"]) == 0


def test_resume_equals_uninterrupted(tmp_path):
    from safetensors.torch import load_file

    pytest.importorskip("sklearn")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert recipe.train_main(["--steps", "4", "--out", str(whole), *TRAIN_ARGS]) == 0
    assert recipe.train_main(["--steps", "2", "--out", str(split), *TRAIN_ARGS]) == 0
    halfway = load_file(split / "checkpoint" / "model.safetensors")
    assert recipe.train_main(["--steps", "4", "--resume", "--out", str(split), *TRAIN_ARGS]) == 0
    a = load_file(whole / "checkpoint" / "model.safetensors")
    b = load_file(split / "checkpoint" / "model.safetensors")
    assert a.keys() == b.keys()
    assert not torch.equal(a["to_posterior.weight"], halfway["to_posterior.weight"])  # steps 3-4 did change it
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ctrl_c_saves_and_resumes(tmp_path, monkeypatch):
    import os
    import signal

    from genfast.training import load_checkpoint

    pytest.importorskip("sklearn")
    calls = {"n": 0}

    def interrupting_loss(*args, **kwargs):  # Ctrl-C arrives during the second step
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return vae_loss(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(recipe, "vae_loss", interrupting_loss)
    assert recipe.train_main(["--steps", "50", "--out", str(out), *TRAIN_ARGS]) == 130
    state, _ = load_checkpoint(out / "checkpoint")
    assert state["step"] == 2  # the step in flight finished, was saved, and training stopped
    assert not (out / "samples" / "final.png").exists()
    monkeypatch.setattr(recipe, "vae_loss", vae_loss)
    assert recipe.train_main(["--steps", "3", "--resume", "--out", str(out), *TRAIN_ARGS]) == 0
    assert load_checkpoint(out / "checkpoint")[0]["step"] == 3


def test_autocast_bf16():
    # What the recipe trains in on a GPU; genfast's transposed convolution runs in the parameters' dtype there.
    model = VAE(TINY16)
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model.loss(x, generator=torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert torch.isfinite(losses["loss"])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
