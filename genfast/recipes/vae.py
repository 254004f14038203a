"""`genfast train vae` and `genfast sample vae`: a convolutional VAE on digits, shapes or a folder of images.

    genfast train vae --steps 2000 --out runs/vae                    # scikit-learn's digits at 32x32
    genfast train vae --data shapes --image-size 32 --out runs/shapes
    genfast sample vae --ckpt runs/vae --mode prior --out prior.png
    genfast sample vae --ckpt runs/shapes --mode arithmetic --attribute-with red --attribute-without blue

Training writes the run folder (<out>/checkpoint, atomic; --resume continues exactly where it stopped), a grid of
prior samples to <out>/samples/step_<N>.png every --sample-every steps, and <out>/samples/final.png and
<out>/samples/reconstructions.png at the end. Under torchrun each process takes its slice of every global batch.

Sample modes (each prints a legend of its rows):
    prior         images decoded from random latents z ~ N(0, I): what the model generates
    reconstruct   rows of data images, each followed by the row of their reconstructions (encode, then decode)
    interpolate   one row per pair of data images: the decoded straight line between their latent means
    arithmetic    images without an attribute (e.g. blue shapes), their reconstructions, and the same with the
                  attribute vector mean(z | with) - mean(z | without) added; then images with it, minus the vector
"""

from __future__ import annotations

import argparse
import sys

import torch

from genfast.data.images import ImageData, batch_indices, load_images
from genfast.models.vae import VAE, VAEConfig, vae_loss
from genfast.recipes._common import (
    add_grid_args,
    add_sample_args,
    backend_errors,
    load_or_exit,
    sample_device,
    write_grid,
)
from genfast.training import (
    CommandParser,
    Run,
    TrainTask,
    add_train_args,
    batch_generator,
    mark_fixed,
    non_negative_float,
    positive_int,
    resolve_device,
    start_run,
)
from genfast.training.budget import check_training_memory

MODES = ("prior", "reconstruct", "interpolate", "arithmetic")
BUILTIN_DATA = ("digits", "shapes")
GRID_SIZE = 64
OPS = ("conv_transpose2d", "reparameterize", "gaussian_kl")


def _train_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="genfast train vae", description="Train a convolutional VAE.")
    add_train_args(parser, recipe="vae", steps=3000, batch_size=64, lr=1e-3, ops=OPS)
    parser.add_argument("--data", default="digits", help="digits (default), shapes, or a folder of images")
    parser.add_argument("--image-size", type=int, default=32, help="a power of two in [8, 256] (default 32)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="image channels (default: 1 for digits, 3 otherwise)")
    parser.add_argument("--latent-dim", type=positive_int, default=16)
    parser.add_argument("--base-channels", type=positive_int, default=32)
    parser.add_argument("--beta", type=non_negative_float, default=1.0, help="weight of the KL term (default 1)")
    mark_fixed(parser, "--data", "--image-size", "--channels", "--latent-dim", "--base-channels", "--beta")
    return parser


def _load_data(parser: argparse.ArgumentParser, source: str, image_size: int, channels: int,
               seed: int) -> ImageData:
    try:
        return load_images(source, image_size, channels, seed=seed)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        parser.error(f"--data: {exc}")


def _noise_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The reparameterization noise of one step and rank: a pure function of them, so resume replays it (and
    distinct from the data's stream, which uses rank slot 0)."""
    seed_value = int(torch.randint(2**62, (), generator=batch_generator(seed, step, rank + 1)))
    return torch.Generator(device=device).manual_seed(seed_value)


def _grid_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _vae_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[VAEConfig, int]:
    channels = args.channels or (1 if args.data == "digits" else 3)
    try:
        return VAEConfig(image_size=args.image_size, channels=channels, latent_dim=args.latent_dim,
                         base_channels=args.base_channels, beta=args.beta), channels
    except ValueError as exc:
        parser.error(str(exc))


def train_main(argv: list[str]) -> int:
    parser = _train_parser()
    args = parser.parse_args(argv)
    config, channels = _vae_config(parser, args)  # bad sizes are usage errors before the run folder is touched
    check_training_memory(parser, build=lambda: [VAE(config)], batch_size=args.batch_size,
                          forward_one=lambda m: m[0](torch.zeros(1, channels, args.image_size, args.image_size)),
                          model_flags=f"--latent-dim {args.latent_dim} --base-channels {args.base_channels}",
                          device=resolve_device(parser, args.device))
    with start_run(parser, args, recipe="vae", ops=OPS) as run:
        config, channels = _vae_config(parser, args)  # (on --resume, with the run's flags where none were given)
        if run.resuming and run.saved_config["model"] != config.to_dict():
            parser.error(f"--resume: the checkpoint in {args.out} was trained with another model config "
                         f"({run.saved_config['model']}); pass the same options")
        data = _load_data(parser, args.data, args.image_size, channels, args.seed)
        return run.train(VAETask(run, config, data))


class VAETask(TrainTask):
    def __init__(self, run: Run, config: VAEConfig, data: ImageData):
        self.run, self.config, self.images = run, config, data.images
        self.model = VAE(config).to(run.device)
        self.modules = {"model": self.model}
        self.optimizers = {"model": torch.optim.Adam(self.model.parameters(), lr=run.args.lr)}
        self.ddp = run.dist.wrap(self.model)
        # The data's name is kept for the record, never read back as a path (sample takes --data from the user).
        self.data_name = str(run.args.data)

    def config_dict(self) -> dict:
        return {"model": self.config.to_dict(), "data": self.data_name, "seed": self.run.args.seed}

    def train_step(self, step: int) -> dict:
        run, args = self.run, self.run.args
        index = batch_indices(len(self.images), args.batch_size, batch_generator(args.seed, step))
        batch = run.dist.shard(self.images[index]).to(run.device, non_blocking=True)
        with run.autocast():
            recon, mu, logvar = self.ddp(batch, generator=_noise_generator(args.seed, step, run.dist.rank,
                                                                           run.device))
        losses = vae_loss(batch, recon, mu, logvar, self.config.beta)
        optimizer = self.optimizers["model"]
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        return {"loss": losses["loss"].detach(), "recon": losses["recon"].detach(), "kl": losses["kl"].detach()}

    def _prior_grid(self, path) -> None:
        self.model.eval()
        with torch.no_grad():
            self.run.save_grid(self.model.sample(GRID_SIZE, generator=_grid_generator(self.run.args.seed,
                                                                                      self.run.device)), path)
        self.model.train()

    def evaluate(self, step: int) -> bool:
        if self.run.dist.is_main:
            self._prior_grid(self.run.samples_dir / f"step_{step:06d}.png")
        return False

    def finish(self, step: int, completed: bool) -> None:
        if not (self.run.dist.is_main and completed):
            return
        self._prior_grid(self.run.samples_dir / "final.png")
        self.model.eval()
        with torch.no_grad():
            originals = self.images[:32].to(self.run.device)
            self.run.save_grid(_pairs_in_rows(originals, self.model.reconstruct(originals)),
                               self.run.samples_dir / "reconstructions.png", nrow=8)
        self.run.say(f"samples: {self.run.samples_dir / 'final.png'}, "
                     f"{self.run.samples_dir / 'reconstructions.png'}")


def _pairs_in_rows(top: torch.Tensor, bottom: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """Rows of ``per_row`` images of ``top`` each followed by the matching row of ``bottom``."""
    rows = []
    for start in range(0, top.shape[0], per_row):
        rows += [top[start:start + per_row], bottom[start:start + per_row]]
    return torch.cat(rows)


# --------------------------------------------------------------------------------------------------- sample
def _sample_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="genfast sample vae", description="Images from a trained VAE.",
                           epilog="modes: prior (decoded random latents), reconstruct (data rows, each followed by "
                                  "its reconstructions), interpolate (one row per pair of data images), arithmetic "
                                  "(add an attribute vector: see --attribute-with)")
    add_sample_args(parser, ops=OPS)
    parser.add_argument("--mode", default="prior", choices=MODES,
                        help="prior: samples from N(0, I); reconstruct: data (odd rows) and reconstructions; "
                             "interpolate: one row per pair of images; arithmetic: add an attribute vector")
    parser.add_argument("--n", type=positive_int, default=None,
                        help="images (prior, reconstruct; default 64) or rows (interpolate; default 8)")
    parser.add_argument("--steps", type=positive_int, default=8, help="frames per interpolation (default 8)")
    parser.add_argument("--data", default=None,
                        help="images for reconstruct/interpolate/arithmetic: digits, shapes or a folder (default: "
                             "the training data when it was digits or shapes; a folder must be named here)")
    parser.add_argument("--attribute-with", default=None, help="class (or word of a class name) that has the "
                                                               "attribute (arithmetic; default: red / first class)")
    parser.add_argument("--attribute-without", default=None, help="class without it (default: blue / second)")
    parser.add_argument("--strength", type=float, default=1.0, help="multiple of the attribute vector to add")
    add_grid_args(parser, out="vae_samples.png")
    return parser


def load_vae(ckpt, device: torch.device | str = "cpu", *, allow_nonfinite: bool = False) -> VAE:
    """The VAE of a run folder (the training --out folder or its checkpoint/), in eval mode."""
    return VAE.from_checkpoint(ckpt, device, allow_nonfinite=allow_nonfinite)


def _class_indices(parser, data: ImageData, name: str, option: str) -> torch.Tensor:
    """Indices of the images whose class is ``name`` or whose class name has ``name`` as one of its words."""
    if data.labels is None:
        parser.error(f"{option}: arithmetic needs labelled images (digits, shapes, or a folder with one subfolder "
                     "per class)")
    classes = [i for i, cls in enumerate(data.class_names) if cls == name or name in cls.split()]
    if not classes:
        parser.error(f"{option}: unknown class {name!r}; known: {', '.join(data.class_names)}")
    mask = torch.isin(data.labels, torch.tensor(classes))
    if not mask.any():
        parser.error(f"{option}: no images of class {name!r} in the data")
    return mask.nonzero().flatten()


def _data_source(parser, args, ckpt) -> str:
    """--data, or the training data when that was a built-in set. A folder path is never read from the checkpoint:
    a checkpoint from elsewhere could otherwise pull any image folder on this machine into the output."""
    if args.data is not None:
        return args.data
    from genfast.models._checkpoint import read_run

    trained_on = load_or_exit(parser, lambda: read_run(ckpt, "vae"))[1].get("data")
    if trained_on in BUILTIN_DATA:
        return trained_on
    parser.error(f"--data: --mode {args.mode} needs images; the model was trained on a folder, which genfast does "
                 "not read from a checkpoint: name it (or another) with --data")


def sample_main(argv: list[str]) -> int:
    parser = _sample_parser()
    args = parser.parse_args(argv)
    if args.mode == "interpolate" and args.steps < 2:
        parser.error("--steps must be >= 2 for interpolate")
    device = sample_device(parser, args, OPS)
    model = load_or_exit(parser, lambda: load_vae(args.ckpt, device, allow_nonfinite=args.allow_nonfinite))
    cfg = model.config
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        if args.mode == "prior":
            n = args.n or 64
            grid = backend_errors(parser, lambda: model.sample(n, generator=g))
            nrow, legend = None, f"{n} images decoded from random latents z ~ N(0, I) (--seed {args.seed})"
        else:
            data = _load_data(parser, _data_source(parser, args, args.ckpt), cfg.image_size, cfg.channels, 0)
            grid, nrow, legend = backend_errors(parser, lambda: _data_mode(parser, args, model, data, g, device))
    write_grid(parser, grid, args.out, nrow=nrow, scale=args.scale, legend=legend)
    return 0


def _data_mode(parser, args, model: VAE, data: ImageData, g: torch.Generator,
               device) -> tuple[torch.Tensor, int, str]:
    images = data.images
    if args.mode == "reconstruct":
        x = images[torch.randperm(len(images), generator=g)[:args.n or 64]].to(device)
        return _pairs_in_rows(x, model.reconstruct(x)), 8, \
            "odd rows: data images; even rows: their reconstructions (encode to the latent mean, decode)"
    if args.mode == "interpolate":
        if len(images) < 2:
            parser.error("--data: interpolate needs at least 2 images")
        index = torch.randperm(len(images), generator=g)
        rows = min(args.n or 8, len(images) // 2)
        x1, x2 = images[index[:rows]].to(device), images[index[rows:2 * rows]].to(device)
        return model.interpolate(x1, x2, args.steps).flatten(0, 1), args.steps, \
            f"one pair of data images per row: {args.steps} frames from the first's latent to the second's"
    # arithmetic: rows of (images without the attribute, their reconstructions, + vector) and the same for the
    # images with it, minus the vector.
    names = data.class_names
    default_with, default_without = ("red", "blue") if any("red" in n.split() for n in names) else (
        names[:2] if len(names) >= 2 else (None, None))
    name_with = args.attribute_with or default_with
    name_without = args.attribute_without or default_without
    if name_with is None or name_without is None:
        parser.error("arithmetic needs --attribute-with and --attribute-without (the data has < 2 classes)")
    if args.attribute_with is None or args.attribute_without is None:
        print(f"arithmetic: comparing class {name_with!r} (with the attribute) and {name_without!r} (without); "
              "choose others with --attribute-with / --attribute-without", file=sys.stderr)
    with_idx = _class_indices(parser, data, name_with, "--attribute-with")
    without_idx = _class_indices(parser, data, name_without, "--attribute-without")
    vector = model.attribute_vector(images[with_idx].to(device), images[without_idx].to(device))
    shown_without = images[without_idx[torch.randperm(len(without_idx), generator=g)[:8]]].to(device)
    shown_with = images[with_idx[torch.randperm(len(with_idx), generator=g)[:8]]].to(device)
    rows = [shown_without, model.reconstruct(shown_without),
            model.add_attribute(shown_without, vector, args.strength),
            shown_with, model.reconstruct(shown_with), model.add_attribute(shown_with, vector, -args.strength)]
    per_row = min(len(shown_without), len(shown_with))
    v = f"({name_with!r} - {name_without!r})"
    legend = (f"1: {name_without!r} images, 2: their reconstructions, 3: + {args.strength:g} x {v}; "
              f"4: {name_with!r} images, 5: their reconstructions, 6: - {args.strength:g} x {v}")
    return torch.cat([r[:per_row] for r in rows]), per_row, legend
