"""`genfast train pixelcnn` and `genfast sample pixelcnn`: a gated PixelCNN (genfast/models/pixelcnn.py) over images
quantized to --levels values per channel, on digits (1 channel) or shapes (3 channels, R then G then B).

    genfast train pixelcnn --out runs/pixelcnn                        # digits, 16x16, 16 levels
    genfast train pixelcnn --data shapes --class-conditional --out runs/pixelcnn-shapes
    genfast sample pixelcnn --ckpt runs/pixelcnn --out pixelcnn.png   # 64 images, drawn pixel by pixel
    genfast sample pixelcnn --ckpt runs/pixelcnn-shapes --label 2 --temperature 0.8

The last 10% of the images (in an order fixed by the data, not by --seed) are held out. Every --sample-every
steps and at the end the run prints the held-out bits per dimension beside the per-pixel marginal model's (an
independent categorical per position, counted on the training images) and writes a grid of 64 samples to
<out>/samples/.
"""

from __future__ import annotations

import argparse
import math

import torch

from genfast.data.images import ImageData, batch_indices, load_images
from genfast.models.pixelcnn import PixelCNN, PixelCNNConfig, dequantize, marginal_bits_per_dim, quantize
from genfast.ops._checks import fits_in_memory
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
    non_negative_float,
    non_negative_int,
    positive_int,
    resolve_device,
    start_run,
)
from genfast.training.budget import check_training_memory
from genfast.training.options import mark_fixed

OPS = ("sample_tokens",)
GRID_SIZE = 64
HELD_OUT = 0.1
EVAL_IMAGES = 512  # held-out images scored at each evaluation (all of them when fewer)
MAX_SAMPLES = 4096


def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) indices: a fixed permutation (seed 0, whatever --seed), the last 10% held out."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    cut = n - max(1, int(n * HELD_OUT))
    return order[:cut], order[cut:]


def _train_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="genfast train pixelcnn", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, recipe="pixelcnn", steps=1000, batch_size=32, lr=2e-3, ops=OPS, sample_every=500)
    parser.add_argument("--data", default="digits", choices=("digits", "shapes"), help="digits (default) or shapes")
    parser.add_argument("--image-size", type=int, default=16, choices=(8, 16, 32), help="default 16")
    parser.add_argument("--levels", type=int, default=16, help="values per channel, 2..256 (default 16)")
    parser.add_argument("--hidden", type=positive_int, default=36, help="features per stack (default 36)")
    parser.add_argument("--layers", type=positive_int, default=5, help="gated layers (default 5)")
    parser.add_argument("--kernel-size", type=positive_int, default=3, help="odd kernel width (default 3)")
    parser.add_argument("--class-conditional", action="store_true", help="condition on the data's class labels")
    mark_fixed(parser, "--data", "--image-size", "--levels", "--hidden", "--layers", "--kernel-size",
               "--class-conditional")
    return parser


def _config(parser, args, num_classes: int) -> PixelCNNConfig:
    channels = 1 if args.data == "digits" else 3
    try:
        return PixelCNNConfig(image_size=args.image_size, channels=channels, levels=args.levels, hidden=args.hidden,
                              layers=args.layers, kernel_size=args.kernel_size, num_classes=num_classes)
    except ValueError as exc:
        parser.error(str(exc).replace("PixelCNNConfig.", "--").replace("_", "-"))


def _load(parser, source: str, image_size: int, channels: int, seed: int) -> ImageData:
    try:
        return load_images(source, image_size, channels, seed=seed)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        parser.error(f"--data {source}: {exc}")


def train_main(argv: list[str]) -> int:
    parser = _train_parser()
    args = parser.parse_args(argv)
    classes = {"digits": 10, "shapes": 9}[args.data] if args.class_conditional else 0
    config = _config(parser, args, classes)  # bad sizes are usage errors before the run folder is touched
    size, c = config.image_size, config.channels
    labels_one = torch.zeros(1, dtype=torch.int64) if classes else None
    check_training_memory(parser, build=lambda: [PixelCNN(config)], batch_size=args.batch_size,
                          forward_one=lambda m: m[0](torch.zeros(1, c, size, size, dtype=torch.int64), labels_one),
                          model_flags=f"--hidden {args.hidden} --layers {args.layers}",
                          device=resolve_device(parser, args.device))
    with start_run(parser, args, recipe="pixelcnn", ops=OPS) as run:
        config = _config(parser, args, classes)
        data = _load(parser, args.data, size, c, 0)
        if classes and data.num_classes != classes:
            parser.error(f"--class-conditional: expected {classes} classes in {args.data}, got {data.num_classes}")
        return run.train(PixelCNNTask(run, config, data))


class PixelCNNTask(TrainTask):
    def __init__(self, run: Run, config: PixelCNNConfig, data: ImageData):
        self.run, self.config = run, config
        train, held = split(len(data))
        levels = quantize(data.images, config.levels)
        self.train_q, self.held_q = levels[train], levels[held]
        labels = data.labels if config.num_classes else None
        self.train_labels = labels[train] if labels is not None else None
        self.held_labels = labels[held][:EVAL_IMAGES] if labels is not None else None
        self.marginal_bpd = marginal_bits_per_dim(self.train_q, self.held_q, config.levels)
        self.model = PixelCNN(config).to(run.device)
        self.modules = {"model": self.model}
        self.optimizers = {"model": torch.optim.Adam(self.model.parameters(), lr=run.args.lr)}
        self.ddp = run.dist.wrap(self.model)
        self.log_every = 10

    def config_dict(self) -> dict:
        return {"model": self.config.to_dict(), "data": self.run.args.data, "marginal_bpd": self.marginal_bpd}

    def train_step(self, step: int) -> dict:
        run, args = self.run, self.run.args
        index = run.dist.shard(batch_indices(len(self.train_q), args.batch_size, batch_generator(args.seed, step)))
        q = self.train_q[index].to(run.device)
        labels = self.train_labels[index].to(run.device) if self.train_labels is not None else None
        # a cosine decay to zero over --steps: the same schedule on resume (it is a function of the step)
        for group in self.optimizers["model"].param_groups:
            group["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        with run.autocast():
            logits = self.ddp(q, labels)
        loss = torch.nn.functional.cross_entropy(logits.float(), q)
        opt = self.optimizers["model"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"bpd": loss.detach() / math.log(2)}

    def _held_out_bpd(self) -> float:
        self.model.eval()
        try:
            q = self.held_q[:EVAL_IMAGES].to(self.run.device)
            labels = self.held_labels.to(self.run.device) if self.held_labels is not None else None
            return float(self.model.bits_per_dim(q, labels).mean())
        finally:
            self.model.train()

    def _grid(self, name: str) -> None:
        self.model.eval()
        try:
            labels = None
            if self.config.num_classes:
                labels = torch.arange(GRID_SIZE, device=self.run.device) % self.config.num_classes
            q = self.model.sample(GRID_SIZE, labels=labels,
                                  generator=torch.Generator(self.run.device).manual_seed(self.run.args.seed))
            self.run.save_grid(dequantize(q, self.config.levels), self.run.samples_dir / name)
        finally:
            self.model.train()

    def evaluate(self, step: int) -> bool:
        if self.run.dist.is_main:
            self.run.say(f"step {step}: held-out bits/dim {self._held_out_bpd():.3f} (per-pixel marginal model: "
                         f"{self.marginal_bpd:.3f})")
            self._grid(f"step_{step:06d}.png")
        return False

    def finish(self, step: int, completed: bool) -> None:
        if self.run.dist.is_main and completed:
            self._grid("final.png")
            self.run.say(f"samples: {self.run.samples_dir / 'final.png'}")


# --------------------------------------------------------------------------------------------------- sample
def sample_main(argv: list[str]) -> int:
    parser = CommandParser(prog="genfast sample pixelcnn", description="Images from a trained PixelCNN, pixel by "
                                                                       "pixel.")
    add_sample_args(parser, ops=OPS)
    parser.add_argument("--n", type=positive_int, default=GRID_SIZE, help=f"images, at most {MAX_SAMPLES} "
                                                                          f"(default {GRID_SIZE})")
    parser.add_argument("--temperature", type=non_negative_float, default=1.0,
                        help="divides the logits; 0 is greedy (default 1)")
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="keep the k likeliest levels (0: all)")
    parser.add_argument("--label", type=non_negative_int, default=None,
                        help="class of every image (class-conditional models; default: classes in turn)")
    parser.add_argument("--no-cache", action="store_true",
                        help="the naive loop: the whole network on the whole image for every draw (for comparison)")
    add_grid_args(parser, out="pixelcnn_samples.png", scale=2)
    args = parser.parse_args(argv)
    if args.n > MAX_SAMPLES:
        parser.error(f"--n {args.n}: at most {MAX_SAMPLES} images")
    device = sample_device(parser, args, OPS)
    model = load_or_exit(parser, lambda: PixelCNN.from_checkpoint(args.ckpt, device))
    cfg = model.config
    try:  # the sampler's cache: every layer's input at every row, in fp32
        fits_in_memory("genfast sample pixelcnn", "--n", args.n,
                       args.n * (cfg.hidden * cfg.layers + 2 * cfg.channels) * (cfg.image_size + cfg.kernel_size)
                       * cfg.image_size * 4, device)
    except ValueError as exc:
        parser.error(str(exc))
    labels, legend_labels = None, ""
    if cfg.num_classes:
        if args.label is not None and args.label >= cfg.num_classes:
            parser.error(f"--label {args.label}: the model knows classes 0..{cfg.num_classes - 1}")
        labels = (torch.full((args.n,), args.label, dtype=torch.int64) if args.label is not None
                  else torch.arange(args.n) % cfg.num_classes).to(device)
        legend_labels = f", class {args.label}" if args.label is not None else ", classes 0.. in turn"
    elif args.label is not None:
        parser.error("--label: this model is not class-conditional")
    generator = torch.Generator(device).manual_seed(args.seed)
    q = backend_errors(parser, lambda: model.sample(args.n, labels=labels, temperature=args.temperature,
                                                    top_k=args.top_k, generator=generator,
                                                    cache=not args.no_cache))
    legend = (f"{args.n} images drawn pixel by pixel (temperature {args.temperature:g}, top-k {args.top_k}"
              f"{legend_labels}, --seed {args.seed})")
    write_grid(parser, dequantize(q, cfg.levels), args.out, nrow=None, scale=args.scale, legend=legend)
    return 0
