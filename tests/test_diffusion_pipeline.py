"""DiffusionPipeline and the ddpm recipe: the sampling loop fused vs reference, determinism, guidance,
v-prediction, a short training run, exact resume, the CLI, clear errors, and the CUDA graph (GPU only)."""

import json

import pytest
import torch
from torch import nn

import genfast
from genfast.data.images import shapes
from genfast.diffusion import DDIMScheduler, DDPMScheduler, DiffusionPipeline, make_scheduler
from genfast.models import UNet, UNetConfig
from genfast.models import unet as unet_module
from genfast.recipes import ddpm as recipe
from genfast.training import load_safetensors_state
from tests.conftest import serving_backends

CUDA = torch.cuda.is_available()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _unet(num_classes=3, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return UNet(UNetConfig.preset("tiny", num_classes=num_classes)).to(device).eval()


def _gen(seed=1, device="cpu"):
    return torch.Generator(device).manual_seed(seed)


# ------------------------------------------------------------------------------------------ sampling loop
@pytest.mark.skipif("triton" not in serving_backends("attention", "cpu"), reason="Triton cannot run here")
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_sampling_loop_fused_matches_reference(kind):
    """Guided, stochastic (DDPM; DDIM with eta = 0.5): UNet, guidance, steps and their noise all agree."""
    pipe = DiffusionPipeline(_unet(), make_scheduler(kind))
    eta = {"eta": 0.5} if kind == "ddim" else {}
    results = {}
    for backend in ("reference", "triton"):
        with genfast.backend(backend):
            results[backend] = pipe.sample(1, 2, guidance_scale=2.5, class_labels=[1], generator=_gen(), **eta)
    torch.testing.assert_close(results["triton"], results["reference"], rtol=1e-4, atol=1e-4)
    with genfast.backend("reference"):  # another seed gives other samples (the comparison is not vacuous)
        other = pipe.sample(1, 2, guidance_scale=2.5, class_labels=[1], generator=_gen(2), **eta)
    assert (other - results["reference"]).abs().max() > 0.1


def test_ddim_eta_zero_is_deterministic():
    pipe = DiffusionPipeline(_unet(num_classes=0), DDIMScheduler())
    gen = _gen()
    a = pipe.sample(2, 4, generator=gen)
    after = gen.get_state()
    expected = _gen()
    torch.randn((2, 3, 8, 8), generator=expected)
    assert torch.equal(after, expected.get_state())  # the steps drew nothing: only the initial noise
    assert torch.equal(a, pipe.sample(2, 4, generator=_gen()))
    noisy = pipe.sample(2, 4, generator=_gen(), eta=1.0)
    assert not torch.equal(a, noisy)


def _manual_loop(unet, scheduler, n, steps, labels, generator, guidance=None):
    """The sampling loop written out: one UNet call per branch, guidance through genfast.ops.cfg_combine."""
    scheduler.set_timesteps(steps)
    x = torch.randn((n, 3, 8, 8), generator=generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(x, t.expand(n), labels)
            if guidance is not None:
                uncond = unet(x, t.expand(n), torch.full_like(labels, unet.null_class))
                out = genfast.ops.cfg_combine(uncond, out, guidance)
            x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_guidance_scale_one_is_the_conditional_model(kind):
    unet = _unet()
    labels = torch.tensor([0, 2])
    ours = DiffusionPipeline(unet, make_scheduler(kind)).sample(2, 3, 1.0, labels, generator=_gen())
    assert torch.equal(ours, _manual_loop(unet, make_scheduler(kind), 2, 3, labels, _gen()))


def test_guidance_equals_cfg_combine_then_step():
    unet = _unet()
    labels = torch.tensor([1, 0])
    ours = DiffusionPipeline(unet, DDPMScheduler()).sample(2, 3, 4.0, labels, generator=_gen())
    theirs = _manual_loop(unet, DDPMScheduler(), 2, 3, labels, _gen(), guidance=4.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, _manual_loop(unet, DDPMScheduler(), 2, 3, labels, _gen()), atol=1e-3)


class _Oracle(nn.Module):
    """A "UNet" that knows the clean image x0 and predicts exactly what a perfect model would."""

    def __init__(self, x0, scheduler, prediction):
        super().__init__()
        self.config = UNetConfig.preset("tiny")
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the pipeline a device and dtype
        self.x0, self.scheduler, self.prediction = x0, scheduler, prediction

    def forward(self, x, t, labels=None):
        a = self.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        return eps if self.prediction == "epsilon" else unet_module.velocity(self.scheduler, self.x0, eps, t)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_a_perfect_model_samples_its_image(kind, prediction):
    """Both parametrisations lead the sampler to x0 when the model is exact (v: x0 = sqrt(a) x - sqrt(1-a) v)."""
    x0 = shapes(2, 8, 3, seed=3).images
    scheduler = make_scheduler(kind, prediction_type=prediction)
    out = DiffusionPipeline(_Oracle(x0, scheduler, prediction), scheduler).sample(2, 20, generator=_gen())
    torch.testing.assert_close(out, x0, rtol=0, atol=2e-3)


def test_velocity_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DDPMScheduler()
    ours = DDPMScheduler()
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(unet_module.velocity(ours, x0, noise, t), theirs.get_velocity(x0, noise, t))


# ------------------------------------------------------------------------------------------ training
@pytest.mark.slow
def test_short_training_run_gets_the_loss_down():
    """Stated bound: the tiny UNet on 256 8x8 shapes, AdamW lr 3e-3, batch 32, 120 steps: the mean epsilon loss
    of the last 20 steps is below 0.25 (it starts above 0.5), and v-prediction (60 steps) gets below 0.42."""
    data = shapes(256, 8, 3, seed=0).images
    for prediction, start_above, bound in (("epsilon", 0.5, 0.25), ("v_prediction", 0.45, 0.42)):
        unet = _unet(num_classes=0).train()
        scheduler = make_scheduler("ddpm", prediction_type=prediction)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3)
        gen = _gen(0)
        losses = []
        for _ in range(120 if prediction == "epsilon" else 60):
            batch = data[torch.randint(0, 256, (32,), generator=gen)]
            loss = unet_module.diffusion_loss(unet, scheduler, batch, None, gen, prediction=prediction)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
        assert first > start_above and last < bound, (prediction, first, last)


def _train_args(out, *extra):
    return ["--config", "tiny", "--batch-size", "8", "--num-images", "32", "--out", str(out), "--quiet",
            "--sample-every", "1000", "--sample-steps", "2", "--warmup", "2", "--lr", "1e-3", "--device", "cpu",
            *extra]


def test_resume_equals_uninterrupted_run(tmp_path):
    args = ("--steps", "4", "--class-cond", "--label-dropout", "0.5", "--prediction", "v_prediction")
    assert recipe.train_main(_train_args(tmp_path / "straight", *args)) == 0
    assert recipe.train_main(_train_args(tmp_path / "split", *args, "--stop-after", "2")) == 0
    first_half = load_safetensors_state(tmp_path / "split" / "checkpoint" / "model.safetensors")
    assert recipe.train_main(_train_args(tmp_path / "split", *args, "--resume")) == 0
    for name in ("model", "ema"):
        a = load_safetensors_state(tmp_path / "straight" / "checkpoint" / f"{name}.safetensors")
        b = load_safetensors_state(tmp_path / "split" / "checkpoint" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)
    assert any(not torch.equal(first_half[k], a[k]) for k in a)  # the resumed half did train
    saved = torch.load(tmp_path / "split" / "checkpoint" / "trainer.pt", weights_only=True)
    assert saved["step"] == 4


def test_cli_train_then_sample_writes_a_png(tmp_path, capsys):
    image_module = pytest.importorskip("PIL.Image")
    from genfast.cli import main

    assert main(["train", "ddpm", *_train_args(tmp_path, "--steps", "3", "--class-cond")]) == 0
    config = json.loads((tmp_path / "checkpoint" / "config.json").read_text())
    assert config["class_names"][0] == "red circle" and config["model"]["num_classes"] == 9
    assert (tmp_path / "samples" / "final.png").is_file() and (tmp_path / "samples" / "step_000003.png").is_file()
    out = tmp_path / "grid.png"
    assert main(["sample", "ddpm", "--ckpt", str(tmp_path), "--n", "6", "--steps", "3", "--scheduler", "ddpm",
                 "--guidance", "2.0", "--label", "blue square", "--out", str(out), "--quiet"]) == 0
    with image_module.open(out) as im:
        im.verify()
    with image_module.open(out) as im:
        assert im.size == (3 * (2 + 3 * 10), 3 * (2 + 2 * 10)) and im.mode == "RGB"  # 3 columns of 8x8, padding 2, x3
    with pytest.raises(SystemExit):
        main(["sample", "ddpm", "--ckpt", str(tmp_path), "--n", "2", "--steps", "2", "--label", "purple circle",
              "--out", str(out)])
    assert "unknown class 'purple circle'; known: red circle" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "ddpm", *_train_args(tmp_path / "bad", "--steps", "1", "--image-size", "9")])
    assert "cannot be halved" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ errors
def test_bad_input_raises_clear_errors():
    pipe = DiffusionPipeline(_unet(), DDPMScheduler())
    with pytest.raises(ValueError, match="unknown scheduler 'euler'; known: ddpm, ddim"):
        make_scheduler("euler")
    with pytest.raises(ValueError, match="unknown option 'beta_sched'"):
        make_scheduler("ddim", beta_sched="linear")
    with pytest.raises(ValueError, match="image_size 13 cannot be halved 1 times"):
        pipe.sample(1, 2, image_size=13)
    with pytest.raises(ValueError, match="needs class_labels"):
        pipe.sample(1, 2, guidance_scale=3.0)
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 3\)"):
        pipe.sample(2, 2, class_labels=[0, 3])
    with pytest.raises(ValueError, match="class_labels must be an int or n=2 integers"):
        pipe.sample(2, 2, class_labels=[0, 1, 2])
    with pytest.raises(ValueError, match="eta applies to DDIM only"):
        pipe.sample(1, 2, eta=0.5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe.sample(1, 0)
    with pytest.raises(ValueError, match="unconditional"):
        DiffusionPipeline(_unet(num_classes=0), DDIMScheduler()).sample(1, 2, class_labels=[0])
    with pytest.raises(TypeError, match="scheduler must be"):
        DiffusionPipeline(_unet(), "ddim")
    if not CUDA:
        with pytest.raises(ValueError, match="cuda_graph=True needs the UNet on a CUDA device"):
            pipe.sample(1, 2, cuda_graph=True)


# ------------------------------------------------------------------------------------------ CUDA graph
@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_cuda_graph_equals_eager_loop(kind):
    unet = _unet(device="cuda")
    pipe = DiffusionPipeline(unet, make_scheduler(kind))
    eta = {"eta": 0.3} if kind == "ddim" else {}
    labels = torch.tensor([0, 1, 2, 0])
    eager = pipe.sample(4, 10, 3.0, labels, generator=_gen(5, "cuda"), **eta)
    graphed = pipe.sample(4, 10, 3.0, labels, generator=_gen(5, "cuda"), cuda_graph=True, **eta)
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    graph = pipe._graph.graph
    again = pipe.sample(4, 10, 3.0, labels.flip(0), generator=_gen(6, "cuda"), cuda_graph=True, **eta)
    assert pipe._graph.graph is graph  # the same shapes replay the captured graph
    torch.testing.assert_close(again, pipe.sample(4, 10, 3.0, labels.flip(0), generator=_gen(6, "cuda"), **eta),
                               rtol=1e-5, atol=1e-5)
