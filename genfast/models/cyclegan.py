"""CycleGAN (Zhu et al., 2017): unpaired image-to-image translation between two domains A and B.

    model = CycleGAN(CycleGANConfig(channels=3))
    out = model.generators(real_a, real_b)          # fake_b, rec_a, fake_a, rec_b (+ idt_a, idt_b)
    losses = generator_losses(model.discriminators, out, real_a, real_b, model.config)
    fake_b = model.translate_a_to_b(real_a)

- Generators (A->B and B->A): the ResNet generator of the paper — reflection padding, a 7x7 stem, strided 3x3
  convolutions down, residual blocks, then transposed 3x3 convolutions up (genfast.nn.ConvTranspose2dNormAct
  with InstanceNorm and ReLU: genfast's kernel for the convolution), a 7x7 head and tanh. With ``input_skip`` the
  head also sees the input image (concatenated to the last features), so the input's colours reach the output
  without passing through the InstanceNorms, which normalise each feature map's mean and scale away. Without it,
  on circles <-> squares that differ only in shape, every translation came out in one colour (green, or blue)
  whatever the input's: a per-image discriminator cannot see that, and a generator can meet the cycle loss by
  hiding the colour in faint patterns (Chu et al., 2017).
- Discriminators (one per domain): the 70x70 PatchGAN, a grid of real/fake logits, one per image patch.
- Losses: least-squares adversarial (LSGAN), cycle consistency L1 (weight lambda_cycle = 10) and identity L1
  (weight lambda_cycle * lambda_identity = 5), the paper's defaults; discriminator losses halved.
- ImagePool: the history buffer of 50 generated images the discriminators also see (Shrivastava et al.), drawing
  its coin flips from its own torch.Generator so that a run replays exactly.

Images are [N, C, H, W] in [-1, 1]; H and W must divide by 2 ** n_downsample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genfast.models._checkpoint import build_and_load, read_run
from genfast.models._config import ModelConfig, check_int, check_ints, check_number
from genfast.nn import ConvTranspose2dNormAct


@dataclass
class CycleGANConfig(ModelConfig):
    channels: int = 3            # image channels of both domains
    ngf: int = 64                # generator width after the stem
    ndf: int = 64                # discriminator width of its first layer
    n_residual: int = 9          # residual blocks (the paper: 6 at 128x128, 9 at 256x256)
    n_downsample: int = 2        # strided convolutions down (and transposed ones up)
    disc_layers: int = 3         # strided layers of the PatchGAN (3: 70x70 receptive field)
    lambda_cycle: float = 10.0
    lambda_identity: float = 0.5  # identity weight relative to lambda_cycle (0 disables the identity loss)
    input_skip: bool = False     # the generators' head also sees the input image (the recipe's default: True)

    def __post_init__(self) -> None:
        check_ints(self, ("channels", "ngf", "ndf", "n_downsample", "disc_layers"))
        check_int(self, "n_residual", minimum=0)
        check_number(self, "lambda_cycle", minimum=0.0)
        check_number(self, "lambda_identity", minimum=0.0)
        if not isinstance(self.input_skip, bool):
            raise ValueError(f"CycleGANConfig.input_skip must be a bool, got {self.input_skip!r}")


def _check_images(name: str, x, channels: int, multiple: int = 1) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [N, C, H, W], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must be [N, {channels}, H, W], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"{name}: height and width must be multiples of {multiple} (2 ** n_downsample), "
                         f"got {x.shape[2]}x{x.shape[3]}")


class ResidualBlock(nn.Module):
    """x + (pad, conv3x3, IN, ReLU, pad, conv3x3, IN)(x): the channel count stays."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """[N, C, H, W] -> [N, C, H, W] in [-1, 1]. InstanceNorm without affine parameters, as in the paper's code,
    so the convolutions keep their biases."""

    def __init__(self, config: CycleGANConfig):
        super().__init__()
        c, ngf = config.channels, config.ngf
        self.config = config
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(c, ngf, 7), nn.InstanceNorm2d(ngf),
                                   nn.ReLU(True)]
        width = ngf
        for _ in range(config.n_downsample):  # (N, w, H, W) -> (N, 2w, H/2, W/2)
            layers += [nn.Conv2d(width, width * 2, 3, stride=2, padding=1), nn.InstanceNorm2d(width * 2),
                       nn.ReLU(True)]
            width *= 2
        layers += [ResidualBlock(width) for _ in range(config.n_residual)]
        self.encode = nn.Sequential(*layers)
        up: list[nn.Module] = []
        for _ in range(config.n_downsample):  # (N, w, H, W) -> (N, w/2, 2H, 2W): genfast's transposed convolution
            up.append(ConvTranspose2dNormAct(width, width // 2, 3, stride=2, padding=1, output_padding=1,
                                             norm="instance", activation="relu"))
            width //= 2
        self.upsample = nn.Sequential(*up)
        self.head = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(width + (c if config.input_skip else 0), c, 7),
                                  nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images("x", x, self.config.channels, 2 ** self.config.n_downsample)
        h = self.encode(x)
        # genfast's conv_transpose2d takes no part in autocast (its input and weight must share a dtype), so the
        # upsampling runs in the parameters' dtype whatever autocast made of h.
        if self.config.n_downsample:
            h = h.to(self.upsample[0][0].weight.dtype)
        features = self.upsample(h)
        if self.config.input_skip:
            features = torch.cat([features, x.to(features.dtype)], dim=1)
        return self.head(features)


class PatchDiscriminator(nn.Module):
    """PatchGAN: [N, C, H, W] -> logits [N, 1, H', W'], one per overlapping patch (70x70 with 3 layers).
    LSGAN trains it against targets 1 (real) and 0 (fake), so there is no sigmoid."""

    def __init__(self, config: CycleGANConfig):
        super().__init__()
        ndf, n = config.ndf, config.disc_layers
        self.config = config
        layers: list[nn.Module] = [nn.Conv2d(config.channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        width = ndf
        for i in range(1, n + 1):  # n - 1 more strided layers, then one with stride 1
            out = ndf * min(2 ** i, 8)
            layers += [nn.Conv2d(width, out, 4, stride=2 if i < n else 1, padding=1), nn.InstanceNorm2d(out),
                       nn.LeakyReLU(0.2, True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def min_size(self) -> int:
        """The smallest image side that leaves at least one patch."""
        n = self.config.disc_layers
        return 3 * 2 ** n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_images("x", x, self.config.channels)
        if min(x.shape[2:]) < self.min_size():
            raise ValueError(f"x: a PatchGAN with disc_layers={self.config.disc_layers} needs images of at least "
                             f"{self.min_size()}x{self.min_size()}, got {x.shape[2]}x{x.shape[3]}")
        return self.net(x)


class CycleGenerators(nn.Module):
    """Both generators; one forward computes everything the generator loss needs (one DDP call per step)."""

    def __init__(self, config: CycleGANConfig):
        super().__init__()
        self.config = config
        self.g_ab = ResnetGenerator(config)
        self.g_ba = ResnetGenerator(config)

    def forward(self, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """fake_b = G_AB(a), rec_a = G_BA(fake_b), fake_a = G_BA(b), rec_b = G_AB(fake_a), and with the identity
        loss on, idt_b = G_AB(b), idt_a = G_BA(a)."""
        fake_b = self.g_ab(real_a)
        fake_a = self.g_ba(real_b)
        out = {"fake_b": fake_b, "rec_a": self.g_ba(fake_b), "fake_a": fake_a, "rec_b": self.g_ab(fake_a)}
        if self.config.lambda_identity > 0:
            out["idt_b"] = self.g_ab(real_b)
            out["idt_a"] = self.g_ba(real_a)
        return out


class CycleDiscriminators(nn.Module):
    """Both discriminators: forward(images_a, images_b) -> (D_A(images_a), D_B(images_b))."""

    def __init__(self, config: CycleGANConfig):
        super().__init__()
        self.d_a = PatchDiscriminator(config)
        self.d_b = PatchDiscriminator(config)

    def forward(self, images_a: torch.Tensor, images_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.d_a(images_a), self.d_b(images_b)


class CycleGAN(nn.Module):
    """The container: ``generators`` (g_ab, g_ba) and ``discriminators`` (d_a, d_b)."""

    def __init__(self, config: CycleGANConfig | None = None):
        super().__init__()
        self.config = config or CycleGANConfig()
        self.generators = CycleGenerators(self.config)
        self.discriminators = CycleDiscriminators(self.config)

    @classmethod
    def from_checkpoint(cls, path, device: str | torch.device = "cpu", *,
                        allow_nonfinite: bool = False) -> "CycleGAN":
        """The CycleGAN of a `genfast train cyclegan` run folder (or its checkpoint folder), in eval mode."""
        directory, saved = read_run(path, "cyclegan")
        config = CycleGANConfig.from_dict(saved["model"])
        roles = {"generators": lambda m: m.generators, "discriminators": lambda m: m.discriminators}
        return build_and_load(lambda: cls(config), directory, roles,
                              allow_nonfinite=allow_nonfinite).to(device).eval()

    def translate_a_to_b(self, images: torch.Tensor) -> torch.Tensor:
        return self.generators.g_ab(images)

    def translate_b_to_a(self, images: torch.Tensor) -> torch.Tensor:
        return self.generators.g_ba(images)


# ------------------------------------------------------------------------------------------------- losses
def lsgan_loss(prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """Least-squares GAN loss: mean((D(x) - 1)^2) for real targets, mean(D(x)^2) for fake ones."""
    if not isinstance(prediction, torch.Tensor):
        raise TypeError(f"prediction must be a tensor, got {type(prediction).__name__}")
    target = torch.ones_like(prediction) if target_is_real else torch.zeros_like(prediction)
    return F.mse_loss(prediction.float(), target.float())


def generator_losses(discriminators: CycleDiscriminators, outputs: dict[str, torch.Tensor], real_a: torch.Tensor,
                     real_b: torch.Tensor, config: CycleGANConfig) -> dict[str, torch.Tensor]:
    """The generators' objective: adversarial (both directions) + lambda_cycle * cycle L1 + identity L1.

    ``outputs`` is CycleGenerators.forward's; ``discriminators`` is called as is (freeze or unwrap it as the
    training loop needs). Returns the terms and their sum under "loss".
    """
    missing = {"fake_a", "fake_b", "rec_a", "rec_b"} - outputs.keys()
    if missing:
        raise ValueError(f"outputs: missing {sorted(missing)} (pass CycleGenerators.forward's result)")
    pred_a, pred_b = discriminators(outputs["fake_a"], outputs["fake_b"])
    losses = {"adv_ab": lsgan_loss(pred_b, True), "adv_ba": lsgan_loss(pred_a, True),
              "cycle": config.lambda_cycle * (F.l1_loss(outputs["rec_a"].float(), real_a.float())
                                              + F.l1_loss(outputs["rec_b"].float(), real_b.float()))}
    if config.lambda_identity > 0:
        if "idt_a" not in outputs or "idt_b" not in outputs:
            raise ValueError("outputs: the identity loss is on but outputs has no idt_a / idt_b")
        weight = config.lambda_cycle * config.lambda_identity
        losses["identity"] = weight * (F.l1_loss(outputs["idt_a"].float(), real_a.float())
                                       + F.l1_loss(outputs["idt_b"].float(), real_b.float()))
    losses["loss"] = sum(losses.values())
    return losses


def discriminator_losses(discriminators: nn.Module, real_a: torch.Tensor, real_b: torch.Tensor,
                         fake_a: torch.Tensor, fake_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each discriminator's LSGAN loss on real images and (pooled, detached) fakes, halved as in the paper so that
    D learns at half the rate of G. Real and fake go through one forward (concatenated: InstanceNorm is per
    image, so this equals two calls)."""
    n_a, n_b = real_a.shape[0], real_b.shape[0]
    pred_a, pred_b = discriminators(torch.cat([real_a, fake_a.detach()]), torch.cat([real_b, fake_b.detach()]))
    d_a = 0.5 * (lsgan_loss(pred_a[:n_a], True) + lsgan_loss(pred_a[n_a:], False))
    d_b = 0.5 * (lsgan_loss(pred_b[:n_b], True) + lsgan_loss(pred_b[n_b:], False))
    return {"d_a": d_a, "d_b": d_b, "loss": d_a + d_b}


# ------------------------------------------------------------------------------------------------- image pool
class ImagePool:
    """A buffer of up to ``size`` past generated images (Shrivastava et al., 2017).

    ``query(images)``: while the buffer fills, each image is stored and returned; afterwards, with probability
    1/2 an image is returned as is, otherwise a random stored image is returned in its place and replaced by it.
    The coin flips and indices come from ``generator`` (a CPU torch.Generator), so the sequence is deterministic;
    ``state_dict`` / ``load_state_dict`` carry the buffer and the generator state into checkpoints.
    size = 0 turns the pool off (query returns its input).
    """

    def __init__(self, size: int = 50, generator: torch.Generator | None = None):
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be an int >= 0, got {size!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.size = size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.images: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() < 1:
            raise TypeError("images must be a tensor [N, ...]")
        if self.size == 0:
            return images.detach()
        if self.images and images.shape[1:] != self.images[0].shape:
            raise ValueError(f"images: shape {tuple(images.shape[1:])} per image differs from the pool's "
                             f"{tuple(self.images[0].shape)}")
        out = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
                continue
            coin = float(torch.rand((), generator=self.generator))
            if coin > 0.5:
                index = int(torch.randint(self.size, (), generator=self.generator))
                out.append(self.images[index].clone())
                self.images[index] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)

    def state_dict(self) -> dict:
        stored = torch.stack(self.images).cpu() if self.images else torch.empty(0)
        return {"size": self.size, "images": stored, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        if state.get("size") != self.size:
            raise ValueError(f"state: a pool of size {state.get('size')} cannot load into one of size {self.size}")
        self.generator.set_state(state["generator"])
        self.images = [image.to(device) if device is not None else image.clone() for image in state["images"]]


__all__ = ["CycleGANConfig", "ResnetGenerator", "PatchDiscriminator", "CycleGenerators", "CycleDiscriminators",
           "CycleGAN", "ImagePool", "lsgan_loss", "generator_losses", "discriminator_losses"]
