"""The gated PixelCNN: what each logit may see (causal, R-G-B within a pixel, no blind spot), the cached sampler
against the naive loop, held-out bits/dim against the per-pixel marginal model, and the recipe's commands."""

import math

import pytest
import torch

import genfast.models
import genfast.ops
from genfast.data.images import digits
from genfast.models.pixelcnn import PixelCNN, PixelCNNConfig, marginal_bits_per_dim, quantize
from tests.recipe_checks import assert_resume_is_exact

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = dict(image_size=8, hidden=12, layers=3, kernel_size=3)


def _dependence(model: PixelCNN, position: tuple[int, int, int]) -> torch.Tensor:
    """Bool [C, S, S]: which input values the logits of (channel, row, column) depend on, in any of 8 random images
    (the union: a ReLU of the head can be off at one image's pixel and hide a path there)."""
    c, i, j = position
    cfg = model.config
    q = torch.randint(0, cfg.levels, (8, cfg.channels, 8, 8), generator=torch.Generator().manual_seed(0))
    x = model.to_input(q).requires_grad_(True)
    labels = torch.arange(8) % cfg.num_classes if cfg.num_classes else None
    logits = model._logits(x, [layer.bias(labels) for layer in model.layers])
    (grad,) = torch.autograd.grad(logits[:, :, c, i, j].square().sum(), x)  # image b's logits read image b only
    return (grad != 0).any(0)


@pytest.mark.parametrize("channels", [1, 3])
def test_logits_see_the_causal_past_only_and_all_of_it_within_reach(channels):
    torch.manual_seed(0)
    model = PixelCNN(PixelCNNConfig(**TINY, channels=channels, num_classes=4 if channels == 3 else 0))
    reach = model.config.receptive_rows  # 3 rows above, 3 columns to the left
    for c in range(channels):
        i, j = 4, 3
        seen = _dependence(model, (c, i, j))
        past = torch.zeros_like(seen)
        past[:, :i] = True
        past[:, i, :j] = True
        past[:c, i, j] = True  # R before G before B within the pixel
        assert not (seen & ~past).any(), f"channel {c} sees a value drawn after it"
        # no blind spot: the upper-right neighbours a plain masked convolution misses are seen
        for di, dj in ((1, 1), (1, 3), (2, 2), (3, 1)):
            assert seen[:, i - di, j + dj].all(), f"blind spot at ({i - di}, {j + dj})"
        assert seen[:, i, j - reach:j].all() and seen[:c, i, j].all()


@pytest.mark.parametrize("channels,classes", [(1, 0), (3, 3)])
def test_cached_sampler_equals_the_naive_loop(channels, classes, monkeypatch):
    torch.manual_seed(1)
    model = PixelCNN(PixelCNNConfig(**TINY, channels=channels, num_classes=classes, levels=8)).eval()
    labels = torch.tensor([0, 1, 2, 1, 0]) if classes else None
    seen: list[torch.Tensor] = []  # every logits row handed to sample_tokens, in order
    draw = genfast.ops.sample_tokens
    monkeypatch.setattr(genfast.ops, "sample_tokens", lambda logits, **kw: seen.append(logits) or draw(logits, **kw))
    cached = model.sample(5, labels=labels, generator=torch.Generator().manual_seed(3), top_k=5)
    cached_logits, seen[:] = list(seen), []
    naive = model.sample(5, labels=labels, generator=torch.Generator().manual_seed(3), top_k=5, cache=False)
    # the same logits for every draw (a stale or missing cached row changes them even where no draw flips)
    assert len(cached_logits) == len(seen) == channels * 64
    torch.testing.assert_close(torch.stack(cached_logits), torch.stack(seen), atol=1e-5, rtol=1e-5)
    other = model.sample(5, labels=labels, generator=torch.Generator().manual_seed(4), top_k=5)
    assert cached.dtype == torch.int64 and cached.shape == (5, channels, 8, 8)
    assert torch.equal(cached, naive)
    assert not torch.equal(cached, other)
    assert int(cached.min()) >= 0 and int(cached.max()) < 8


def test_greedy_sampling_takes_each_argmax():
    torch.manual_seed(2)
    model = PixelCNN(PixelCNNConfig(**TINY)).eval()
    q = model.sample(3, temperature=0.0)
    assert torch.equal(q, model.sample(3, temperature=0.0, cache=False))
    # each greedy value is the argmax of the logits given the values before it (ties: lowest level)
    assert torch.equal(model(q).argmax(1), q)


def test_training_beats_the_per_pixel_marginal_model_on_held_out_digits():
    torch.manual_seed(0)
    levels = 8
    q = quantize(digits(8).images, levels)
    order = torch.randperm(len(q), generator=torch.Generator().manual_seed(0))
    train, held = q[order[:1500]], q[order[1500:]]
    model = PixelCNN(PixelCNNConfig(**{**TINY, "hidden": 24}, levels=levels))
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(80):
        loss = model.loss(train[torch.randint(len(train), (64,), generator=g)])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    bpd = float(model.bits_per_dim(held).mean())
    marginal = marginal_bits_per_dim(train, held, levels)
    assert 0 < bpd < marginal < math.log2(levels), (bpd, marginal)


def test_marginal_baseline_is_the_entropy_of_a_known_histogram():
    train = torch.tensor([[0], [0], [1], [1]])  # one dimension: counts 2, 2 (+1 smoothing each) of 2 levels
    assert marginal_bits_per_dim(train, torch.tensor([[0]]), 2) == pytest.approx(1.0)


def test_bad_inputs_are_named():
    model = PixelCNN(PixelCNNConfig(**TINY))
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="levels in"):
        model(torch.full((1, 1, 8, 8), 16))
    with pytest.raises(ValueError, match=r"\[N, 1, 8, 8\]"):
        model(torch.zeros(1, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="not class-conditional"):
        model.sample(1, labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="multiple of channels"):
        PixelCNNConfig(channels=3, hidden=16)
    with pytest.raises(ValueError, match="n must be"):
        model.sample(0)


def _usage_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_train_sample_and_load_from_the_command_line(tmp_path, capsys):
    from genfast.recipes.pixelcnn import sample_main, train_main

    out = tmp_path / "run"
    assert train_main(["--out", str(out), "--steps", "2", "--image-size", "8", "--hidden", "6", "--layers", "2",
                       "--data", "shapes", "--class-conditional", "--quiet", "--sample-every", "2",
                       "--device", "cpu"]) == 0
    assert "held-out bits/dim" in capsys.readouterr().err and (out / "samples" / "final.png").exists()
    model = genfast.models.load(out)
    assert isinstance(model, PixelCNN) and model.config.channels == 3 and model.config.num_classes == 9
    png = tmp_path / "s.png"
    assert sample_main(["--ckpt", str(out), "--n", "2", "--label", "2", "--out", str(png), "--device", "cpu"]) == 0
    assert png.exists()
    capsys.readouterr()
    assert "--label 9" in _usage_error(sample_main, ["--ckpt", str(out), "--label", "9"], capsys)
    assert "--levels" in _usage_error(train_main, ["--out", str(tmp_path / "x"), "--levels", "1"], capsys)
    assert "--n" in _usage_error(sample_main, ["--ckpt", str(out), "--n", "100000"], capsys)


def test_resume_continues_exactly(tmp_path):
    from genfast.recipes.pixelcnn import train_main

    flags = ["--image-size", "8", "--hidden", "6", "--layers", "2", "--quiet", "--sample-every", "100",
             "--device", "cpu", "--steps", "4"]
    assert_resume_is_exact(train_main, flags, tmp_path)
