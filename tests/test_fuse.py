"""genfast.fuse keeps the original state_dict keys (both ways, running statistics included) and says whether it
copies: inplace=True modifies and shares, inplace=False leaves the caller's model alone."""

import copy
import io

import pytest
import torch
from torch import nn

import genfast
from genfast.nn import ConvTranspose2dNormAct


def generator() -> nn.Module:
    """A DCGAN-like generator: fused runs inside a nested Sequential, one lone conv, one unfused tail."""
    torch.manual_seed(0)
    model = nn.Module()
    model.net = nn.Sequential(
        nn.ConvTranspose2d(6, 5, 3, stride=2), nn.BatchNorm2d(5), nn.ReLU(),
        nn.ConvTranspose2d(5, 4, 3, padding=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(4, 3, 3, padding=1), nn.Tanh(),
    )
    model.head = nn.ConvTranspose2d(3, 2, 1)
    model.forward = lambda x: model.head(model.net(x))
    return model


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.head(model.net(x))


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    """One SGD step in train mode: moves weights and the BatchNorm running statistics away from their init."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run(model, x).square().mean().backward()
    opt.step()


def assert_same_state(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_fused_model_keeps_the_original_keys():
    model = generator()
    keys = list(model.state_dict())
    fused, report = genfast.fuse(model)
    assert isinstance(fused.net[0], ConvTranspose2dNormAct) and isinstance(fused.net[1], nn.Identity), str(report)
    assert list(fused.state_dict()) == keys
    assert "net.1.running_mean" in keys and "net.4.num_batches_tracked" in keys


def test_original_checkpoint_loads_into_fused_model_and_back():
    x = torch.randn(2, 6, 5, 5)
    trained = generator()
    train_step(trained, x)  # running statistics and weights differ from a fresh model's now
    fused, _ = genfast.fuse(generator())
    fused.load_state_dict(trained.state_dict())  # strict: every key matched
    assert_same_state(fused.state_dict(), trained.state_dict())
    trained.eval()
    fused.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(fused, x), run(trained, x), rtol=1e-5, atol=1e-5)

    # ... and the fused model's checkpoint, after it trained on, loads into a plain torch model.
    train_step(fused, x)
    plain = generator()
    plain.load_state_dict(fused.state_dict())
    assert_same_state(plain.state_dict(), fused.state_dict())
    assert plain.net[1].num_batches_tracked.item() == 2
    fused.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(plain, x), run(fused, x), rtol=1e-5, atol=1e-5)


def test_checkpoint_round_trip_through_bytes_and_block_names_still_load():
    fused, _ = genfast.fuse(generator())
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh, _ = genfast.fuse(generator())
    fresh.load_state_dict(state)
    # The block's own layout ("net.0.1.running_mean"), as older fused checkpoints wrote it, loads too.
    own = {k.replace("net.1.", "net.0.1.").replace("net.4.", "net.3.1."): v for k, v in state.items()}
    assert "net.0.1.running_mean" in own
    fresh.load_state_dict(own)
    assert_same_state(fresh.state_dict(), state)


def test_missing_and_unexpected_keys_are_still_reported():
    fused, _ = genfast.fuse(generator())
    state = fused.state_dict()
    del state["net.1.running_var"]
    state["net.9.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="running_var") as info:
        fused.load_state_dict(state)
    assert "net.9.weight" in str(info.value)
    both = fused.state_dict()
    both["net.0.1.running_mean"] = both["net.1.running_mean"]
    with pytest.raises(RuntimeError, match="holds both 'net.1.running_mean' and 'net.0.1.running_mean'"):
        fused.load_state_dict(both)


def test_inplace_true_modifies_and_shares_weights():
    model = generator()
    weight = model.net[0].weight
    fused, _ = genfast.fuse(model)
    assert fused is model
    assert fused.net[0].conv.weight is weight


def test_inplace_false_copies_and_leaves_the_model_alone():
    model = generator()
    before = copy.deepcopy(model.state_dict())
    fused, report = genfast.fuse(model, inplace=False)
    assert fused is not model and report.replaced
    assert type(model.net[0]) is nn.ConvTranspose2d and type(model.net[1]) is nn.BatchNorm2d
    assert model.net[0].weight is not fused.net[0].conv.weight
    assert_same_state(model.state_dict(), before)
    assert_same_state(fused.state_dict(), before)


def test_fused_model_survives_deepcopy_and_pickle():
    fused, _ = genfast.fuse(generator())
    keys = list(generator().state_dict())
    assert list(copy.deepcopy(fused).state_dict()) == keys
    buffer = io.BytesIO()
    torch.save(fused.net, buffer)
    buffer.seek(0)
    net = torch.load(buffer, weights_only=False)  # our own object, written just above
    assert list(net.state_dict()) == [k[len("net."):] for k in keys if k.startswith("net.")]


def test_fusing_again_changes_nothing():
    fused, _ = genfast.fuse(generator())
    keys = list(fused.state_dict())
    again, report = genfast.fuse(fused)
    assert not report.replaced
    assert list(again.state_dict()) == keys


@pytest.mark.parametrize("inplace", [1, "yes", None])
def test_inplace_must_be_a_bool(inplace):
    with pytest.raises(TypeError, match="inplace must be a bool"):
        genfast.fuse(generator(), inplace=inplace)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        genfast.fuse({"weight": torch.zeros(1)})


def test_printout_names_genfast_and_what_was_replaced():
    """repr of a fused model: every genfast module names genfast, the block names what it fuses, and the slots the
    block emptied say what they held (no bare Identity() or torch-named MultiheadAttention)."""
    model = generator()
    model.attn = nn.MultiheadAttention(8, 2)
    fused, _ = genfast.fuse(model)
    text = repr(fused)
    assert "(0): genfast.ConvTranspose2dNormAct(\n      fuses ConvTranspose2d + BatchNorm2d + ReLU" in text, text
    assert "(1): genfast.FusedSlot(BatchNorm2d fused into '0')" in text and "(5): genfast.FusedSlot(LeakyReLU fused "\
        "into '3')" in text, text
    assert "(head): genfast.ConvTranspose2d(3, 2, kernel_size=(1, 1), stride=(1, 1), drop-in for " \
        "torch.nn.ConvTranspose2d)" in text, text
    mha = "(attn): genfast.MultiheadAttention(\n    embed_dim=8, num_heads=2, drop-in for torch.nn.MultiheadAttention"
    assert mha in text, text
    assert "Identity()" not in text and ": MultiheadAttention(" not in text, text
    assert isinstance(fused.net[1], nn.Identity)  # still an identity where code checks for one


class _ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = nn.Sequential(nn.Sequential(nn.ConvTranspose2d(4, 3, 4, 2, 1), nn.BatchNorm2d(3), nn.ReLU()))

    def forward(self, z):
        return self.decoder(z.to(self.decoder[0][0].weight.dtype))


def test_model_code_reading_the_replaced_conv_weight_still_runs():
    """A model that reads its convolution's parameters through the old index (as genfast's VAE does,
    ``self.decoder[0][0].weight``) runs after fuse(): the block answers .weight and .bias with its conv's."""
    torch.manual_seed(0)
    model = _ReadsWeight().eval()
    z = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    want = model(z)
    fused, report = genfast.fuse(model, inplace=False)
    assert len(report.replaced) == 1, str(report)
    block = fused.decoder[0][0]
    assert isinstance(block, ConvTranspose2dNormAct)
    assert block.weight is block.conv.weight and block.bias is block.conv.bias
    torch.testing.assert_close(fused(z), want, atol=1e-5, rtol=1e-5)
