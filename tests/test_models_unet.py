"""genfast.models.UNet: fused (Triton attention and transposed convolution) against the reference backend,
forward and gradients; configs, conditioning, and clear errors. Triton runs in its interpreter on CPU, so the
fused comparisons use the tiny config (8x8)."""

import pytest
import torch

import genfast
from genfast.models import UNet, UNetConfig
from genfast.models.unet import PRESETS, timestep_embedding
from tests.conftest import serving_backends

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _counting(monkeypatch, module, name: str) -> list:
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _run(unet, backend, x, t, y, weight):
    unet.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with genfast.backend(backend):
        out = unet(x, t, y)
        (out * weight).sum().backward()
    grads = {name: p.grad.clone() for name, p in unet.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.skipif("triton" not in serving_backends("attention", "cpu"), reason="Triton cannot run here")
def test_fused_unet_matches_reference_forward_and_gradients(monkeypatch):
    from genfast.kernels import attention as attention_kernels
    from genfast.kernels import conv_transpose as conv_kernels

    torch.manual_seed(0)
    unet = UNet(UNetConfig.preset("tiny", num_classes=3))
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([7, 901])
    y = torch.tensor([2, 3])  # 3 = the null class
    weight = torch.randn(2, 3, 8, 8)
    ref_out, ref_dx, ref_grads = _run(unet, "reference", x, t, y, weight)
    calls = _counting(monkeypatch, attention_kernels, "attention_fwd")
    bwd_calls = _counting(monkeypatch, attention_kernels, "attention_bwd")
    conv_calls = _counting(monkeypatch, conv_kernels, "conv_transpose2d")
    out, dx, grads = _run(unet, "triton", x, t, y, weight)
    # The fused path really ran genfast's kernels: 4 attention blocks (down, middle, 2 up), 1 upsampling.
    assert len(calls) == 4 and len(bwd_calls) == 4 and len(conv_calls) == 1
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5 * float(ref_dx.abs().max()))
    assert grads.keys() == ref_grads.keys() and len(grads) == len(list(unet.parameters()))
    for name, grad in grads.items():
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=2e-5 * max(scale, 1e-3), msg=name)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_and_keep_the_shape(preset):
    cfg = UNetConfig.preset(preset)
    unet = UNet(cfg)
    x = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        out = unet(x, 10)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg


def test_nearest_upsampling_and_other_channels():
    cfg = UNetConfig.preset("tiny", upsample="nearest", in_channels=1, out_channels=2)
    unet = UNet(cfg)
    assert not any(isinstance(m, genfast.nn.ConvTranspose2d) for m in unet.modules())
    out = unet(torch.randn(3, 1, 16, 16), torch.tensor([0, 1, 2]))  # any multiple of 2 works for two levels
    assert out.shape == (3, 2, 16, 16)


def test_conditioning_changes_the_output():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.preset("tiny", num_classes=2)).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        a, b = unet(x, 50, torch.tensor([0])), unet(x, 50, torch.tensor([1]))
        null, default = unet(x, 50, torch.tensor([2])), unet(x, 50)
        later = unet(x, 51, torch.tensor([0]))
    assert not torch.equal(a, b) and not torch.equal(a, later)
    assert torch.equal(null, default)  # no labels = the null class


def test_label_dropout():
    unet = UNet(UNetConfig.preset("tiny", num_classes=5))
    labels = torch.arange(5).repeat(200)
    assert torch.equal(unet.drop_labels(labels, 0.0), labels)
    assert (unet.drop_labels(labels, 1.0) == 5).all()
    dropped = unet.drop_labels(labels, 0.25, generator=torch.Generator().manual_seed(0))
    fraction = (dropped == 5).float().mean().item()
    assert 0.19 < fraction < 0.31  # 1000 draws: 5 standard deviations either side
    assert torch.equal(dropped[dropped != 5], labels[dropped != 5])


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0, 1, 999]), 9)
    assert emb.shape == (3, 9) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[0, :4], torch.ones(4))  # cos(0)
    assert not torch.allclose(emb[1], emb[2])


def test_bad_configs_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="cannot be halved 3 times"):
        UNetConfig.preset("32", image_size=36)
    with pytest.raises(ValueError, match=r"unknown options \['widht'\]"):
        UNetConfig.from_dict({"widht": 3})
    with pytest.raises(ValueError, match="unknown preset"):
        UNetConfig.preset("128")
    with pytest.raises(ValueError, match="num_groups"):
        UNetConfig.preset("tiny", num_groups=3)
    with pytest.raises(ValueError, match="upsample"):
        UNetConfig.preset("tiny", upsample="bilinear")
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNetConfig.preset("tiny", attention_head_dim=6)
    with pytest.raises(TypeError, match="UNetConfig"):
        UNet({"image_size": 8})
    unet = UNet(UNetConfig.preset("tiny"))
    with pytest.raises(ValueError, match="height 9 cannot be halved 1 times"):
        unet(torch.randn(1, 3, 9, 8), 0)
    with pytest.raises(ValueError, match=r"x must be \[B, 3, H, W\]"):
        unet(torch.randn(1, 1, 8, 8), 0)
    with pytest.raises(ValueError, match="timesteps"):
        unet(torch.randn(2, 3, 8, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="unconditional"):
        unet(torch.randn(1, 3, 8, 8), 0, torch.tensor([0]))
    with pytest.raises(ValueError, match="unconditional"):
        unet.null_class
    conditional = UNet(UNetConfig.preset("tiny", num_classes=2))
    with pytest.raises(ValueError, match="class_labels"):
        conditional(torch.randn(2, 3, 8, 8), 0, torch.tensor([0.0, 1.0]))
