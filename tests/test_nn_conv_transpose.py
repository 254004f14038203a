"""genfast.nn.ConvTranspose2d, ConvTranspose2dNormAct and genfast.fuse() on small GAN/VAE generators.

Every check runs on each kernel backend that can serve conv_transpose2d here and on ``auto``; models are tiny
because the Triton interpreter runs them on the CPU.
"""

import copy

import pytest
import torch
from torch import nn

import genfast
from genfast.nn import ConvTranspose2d, ConvTranspose2dNormAct
from tests.conftest import backend_params

BACKENDS = [pytest.param("cpu", "auto", id="cpu-auto")] + backend_params("conv_transpose2d")
TOL = dict(atol=1e-4, rtol=1e-4)


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and running statistics, so that folding them is actually tested."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            n = m.num_features
            if m.weight is not None:
                m.weight.data = 0.5 + torch.rand(n, generator=gen)
                m.bias.data = torch.randn(n, generator=gen) * 0.3
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
    return model


# ------------------------------------------------------------------------------------------- modules
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_conv_transpose2d_is_a_drop_in(device, backend):
    torch.manual_seed(0)
    ref = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1)
    ours = ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 5, 4)
    with genfast.backend(backend):
        torch.testing.assert_close(ours(x), ref(x), **TOL)
        # torch's output_size argument picks the output padding.
        torch.testing.assert_close(ours(x, output_size=[9, 8]), ref(x, output_size=[9, 8]), **TOL)
        act = ConvTranspose2d(6, 4, 3, stride=2, groups=2, activation="leaky_relu", negative_slope=0.2)
        act.load_state_dict(ref.state_dict())
        ref_act = nn.functional.leaky_relu(nn.functional.conv_transpose2d(x, ref.weight, ref.bias, 2, groups=2), 0.2)
        torch.testing.assert_close(act(x), ref_act, **TOL)
    assert "activation='leaky_relu'" in repr(act)
    with pytest.raises(ValueError, match="activation"):
        ConvTranspose2d(6, 4, 3, activation="swish")


def _sequential(norm_cls, act):
    return nn.Sequential(nn.ConvTranspose2d(6, 4, 4, 2, 1), norm_cls(4), act)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_norm_act_state_dict_and_modes(device, backend, norm):
    torch.manual_seed(0)
    norm_cls = nn.BatchNorm2d if norm == "batch" else nn.InstanceNorm2d
    seq = randomize_norms(_sequential(norm_cls, nn.LeakyReLU(0.2)))
    block = ConvTranspose2dNormAct(6, 4, 4, 2, 1, norm=norm, activation="leaky_relu", negative_slope=0.2)
    assert block.state_dict().keys() == seq.state_dict().keys()
    block.load_state_dict(seq.state_dict())
    x = torch.randn(3, 6, 3, 5)
    with genfast.backend(backend):
        for _ in range(2):  # training: batch statistics, running statistics and the step counter as torch
            torch.testing.assert_close(block(x), seq(x), **TOL)
        for key, value in seq.state_dict().items():
            torch.testing.assert_close(block.state_dict()[key], value, **TOL)
        block.eval()
        seq.eval()
        torch.testing.assert_close(block(x), seq(x), **TOL)
    # ... and back into a plain Sequential.
    fresh = _sequential(norm_cls, nn.LeakyReLU(0.2))
    fresh.load_state_dict(block.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(x), seq(x), **TOL)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_batchnorm_momentum_none_and_eval_gradients(device, backend):
    torch.manual_seed(1)
    seq = randomize_norms(nn.Sequential(nn.ConvTranspose2d(5, 3, 3, 2, 1, 1), nn.BatchNorm2d(3, momentum=None),
                                        nn.SiLU()))
    block = ConvTranspose2dNormAct(5, 3, 3, 2, 1, 1, momentum=None, activation="silu")
    block.load_state_dict(seq.state_dict())
    x = torch.randn(2, 5, 4, 4)
    with genfast.backend(backend):
        for _ in range(3):  # cumulative moving average
            torch.testing.assert_close(block(x), seq(x), **TOL)
        torch.testing.assert_close(block[1].running_var, seq[1].running_var, **TOL)
        assert block[1].num_batches_tracked.item() == seq[1].num_batches_tracked.item() == 3
        block.eval()
        seq.eval()
        g = torch.randn(2, 3, 8, 8)
        ours = torch.autograd.grad(block(x), list(block.parameters()), g)
        want = torch.autograd.grad(seq(x), list(seq.parameters()), g)
    for a, b in zip(ours, want):  # gradients reach the conv and the norm's affine parameters through the fold
        torch.testing.assert_close(a, b, **TOL)


def test_norm_act_arguments():
    with pytest.raises(ValueError, match="norm"):
        ConvTranspose2dNormAct(4, 4, 3, norm="layer")
    block = ConvTranspose2dNormAct(4, 4, 3, norm=None, activation=None)
    assert len(block) == 1
    assert isinstance(ConvTranspose2dNormAct(4, 4, 3, norm="instance")[1], nn.InstanceNorm2d)


# ------------------------------------------------------------------------------------------- models for fuse()
def dcgan_generator(nz=8, ngf=4, nc=3):
    return nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 4), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2), nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, nc, 4, 2, 1, bias=False), nn.Tanh(),
    )


class ResnetBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim), nn.ReLU(True),
                                   nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim))

    def forward(self, x):
        return x + self.block(x)


def cyclegan_generator(ngf=4):
    return nn.Sequential(
        nn.ReflectionPad2d(3), nn.Conv2d(3, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True),
        nn.Conv2d(ngf, ngf * 2, 3, 2, 1), nn.InstanceNorm2d(ngf * 2), nn.ReLU(True),
        ResnetBlock(ngf * 2),
        nn.ConvTranspose2d(ngf * 2, ngf, 3, 2, 1, output_padding=1), nn.InstanceNorm2d(ngf), nn.ReLU(True),
        nn.ReflectionPad2d(3), nn.Conv2d(ngf, 3, 7), nn.Tanh(),
    )


class VAEDecoder(nn.Module):
    def __init__(self, latent=6, ch=8):
        super().__init__()
        self.ch = ch
        self.fc = nn.Linear(latent, ch * 4 * 4)
        self.up1 = nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1)  # an attribute called from forward: a lone conv
        self.net = nn.Sequential(nn.LeakyReLU(0.2), nn.ConvTranspose2d(ch // 2, ch // 2, 4, 2, 1),
                                 nn.BatchNorm2d(ch // 2), nn.ReLU6(), nn.ConvTranspose2d(ch // 2, 3, 3, 1, 1),
                                 nn.Sigmoid())

    def forward(self, z):
        return self.net(self.up1(self.fc(z).view(-1, self.ch, 4, 4)))


MODELS = [
    ("dcgan", dcgan_generator, (2, 8, 1, 1), 3),
    ("cyclegan", cyclegan_generator, (1, 3, 12, 12), 1),
    ("vae", VAEDecoder, (2, 6), 3),
]


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name,build,in_shape,n_replaced", MODELS, ids=[m[0] for m in MODELS])
def test_fuse_keeps_outputs(device, backend, mode, name, build, in_shape, n_replaced):
    torch.manual_seed(0)
    model = randomize_norms(build())
    model.train(mode == "train")
    fused, report = genfast.fuse(copy.deepcopy(model))
    assert len(report.replaced) == n_replaced, str(report)
    assert not any(type(m) is nn.ConvTranspose2d for m in fused.modules()), str(report)
    x = torch.randn(in_shape)
    with genfast.backend(backend):
        out = fused(x)
        want = model(x)
        torch.testing.assert_close(out, want, **TOL)
        if mode == "train":
            g = torch.randn_like(out)
            ours = torch.autograd.grad(out, list(fused.parameters()), g)
            theirs = torch.autograd.grad(want, list(model.parameters()), g)
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, **TOL)
            buffers = dict(model.named_buffers())
            assert sorted(t.sum().item() for t in fused.buffers()) == pytest.approx(
                sorted(t.sum().item() for t in buffers.values()), rel=1e-5)


def test_fuse_report_and_idempotence():
    model = VAEDecoder()
    fused, report = genfast.fuse(model)
    assert fused is model
    replaced = dict(report.replaced)
    assert replaced["up1"] == "genfast.nn.ConvTranspose2d"
    assert replaced["net.1+2"] == "genfast.nn.ConvTranspose2dNormAct(ConvTranspose2d, BatchNorm2d)"
    assert replaced["net.4+5"] == "genfast.nn.ConvTranspose2dNormAct(ConvTranspose2d, Sigmoid)"
    left = dict(report.left_alone)
    assert "not an activation genfast fuses" in left["net.3"]
    assert isinstance(model.net[2], nn.Identity) and isinstance(model.net[3], nn.ReLU6)
    assert "replaced" in str(report)
    _, again = genfast.fuse(model)
    assert again.replaced == []


def test_fuse_leaves_unsupported_alone():
    model = nn.Sequential(nn.ConvTranspose1d(3, 3, 3), nn.ConvTranspose2d(3, 3, 3), nn.BatchNorm1d(3))
    _, report = genfast.fuse(model)
    left = dict(report.left_alone)
    assert "2-D transposed convolutions only" in left["0"]
    assert "not a 2-D norm" in left["2"]
    assert dict(report.replaced)["1"] == "genfast.nn.ConvTranspose2d"
    with pytest.raises(ValueError, match="unknown rewrites"):
        genfast.fuse(model, rewrites=["nope"])
