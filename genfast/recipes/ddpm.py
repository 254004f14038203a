"""`genfast train ddpm` and `genfast sample ddpm`: a diffusion UNet on shapes, digits or a folder of images.

    genfast train ddpm --data shapes --config 32 --steps 20000 --out runs/ddpm
    genfast train ddpm --data digits --class-cond --label-dropout 0.1 --prediction v_prediction --out runs/digits
    genfast sample ddpm --ckpt runs/digits --n 64 --steps 50 --scheduler ddim --guidance 3.0 --label 7 --out 7s.png

Training: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps at a uniformly drawn timestep, and the UNet learns eps
(``--prediction epsilon``) or v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 (``v_prediction``) with a mean squared
error (genfast.models.unet.diffusion_loss); AdamW with a warmup and cosine decay; EMA weights (``--ema``) are kept,
saved and used for every sample. The run folder gets <out>/checkpoint (atomic; ``--resume`` continues bit for bit:
the data, noise, timesteps and label dropout of a step are pure functions of the seed and the step), a PNG grid of
EMA samples every --sample-every steps (<out>/samples/step_<N>.png) and <out>/samples/final.png at the end (with its
own progress bar). Under torchrun each process takes its slice of every global batch (DDP); on a GPU it trains in
bf16 autocast.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from genfast.data.images import ImageData, batch_indices, load_images
from genfast.diffusion.pipeline import SCHEDULERS, DiffusionPipeline, make_scheduler
from genfast.models.unet import PREDICTIONS, PRESETS, UNet, UNetConfig, diffusion_loss
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
    default_warmup,
    mark_fixed,
    non_negative_float,
    non_negative_int,
    open_probability,
    positive_int,
    start_run,
    warmup_cosine_lr,
)

GRID_SIZE = 16
LOG_EVERY = 10  # steps between reading the loss on the host (a GPU synchronisation)
OPS = ("conv_transpose2d", "attention", "scheduler_step")
WARMUP = 200  # --warmup's default for a long run (default_warmup scales it to short ones)


# ------------------------------------------------------------------------------------------------ EMA
@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over parameters (and a copy of buffers)."""
    ema_params, params = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)
    for eb, b in zip(ema.buffers(), model.buffers()):
        eb.copy_(b)


def ema_decay(step: int, target: float) -> float:
    """Warm-up of the EMA (as in many diffusion codebases): (1 + step) / (10 + step), capped at ``target``, so
    that short runs do not sample from weights that are mostly the initial ones."""
    return min(target, (1 + step) / (10 + step))


def _step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """Noise, timesteps and label dropout of one step and rank: a pure function of them (resume replays it),
    distinct from the data's stream (which uses rank slot 0)."""
    value = int(torch.randint(2**62, (), generator=batch_generator(seed, step, rank + 1)))
    return torch.Generator(device=device).manual_seed(value)


# ------------------------------------------------------------------------------------------------ train
def _train_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="genfast train ddpm", description="Train a diffusion UNet (DDPM).")
    add_train_args(parser, recipe="ddpm", steps=20000, batch_size=64, lr=2e-4, ops=OPS)
    parser.add_argument("--data", default="shapes", help="shapes (default), digits, or a folder of images")
    parser.add_argument("--config", default="32", choices=tuple(PRESETS), help="UNet size (default 32)")
    parser.add_argument("--image-size", type=positive_int, default=None, help="default: the config's (32, 64 or 8)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="image channels (default: 1 for digits, 3 otherwise)")
    parser.add_argument("--num-images", type=positive_int, default=2048, help="images drawn for --data shapes")
    parser.add_argument("--base-channels", type=positive_int, default=None, help="UNet width (default: the config's)")
    parser.add_argument("--upsample", default=None, choices=("conv_transpose", "nearest"),
                        help="UNet upsampling (default: the config's, a transposed convolution)")
    parser.add_argument("--prediction", default="epsilon", choices=PREDICTIONS)
    parser.add_argument("--num-train-timesteps", type=positive_int, default=1000)
    parser.add_argument("--beta-schedule", default="linear", choices=("linear", "squaredcos_cap_v2"))
    parser.add_argument("--ema", type=open_probability, default=0.999, help="EMA decay of the sampling weights")
    parser.add_argument("--class-cond", action="store_true", help="condition on the data's class labels")
    parser.add_argument("--label-dropout", type=open_probability, default=0.1,
                        help="probability of training a label as the null class (classifier-free guidance)")
    parser.add_argument("--warmup", type=non_negative_int, default=None,
                        help=f"learning-rate warmup steps (default {WARMUP}, at most a tenth of --steps)")
    parser.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    parser.add_argument("--grad-clip", type=non_negative_float, default=1.0, help="max gradient norm (0: none)")
    parser.add_argument("--sample-steps", type=positive_int, default=50, help="DDIM steps of the sample grids")
    mark_fixed(parser, "--data", "--config", "--image-size", "--channels", "--num-images", "--base-channels",
               "--upsample", "--prediction", "--num-train-timesteps", "--beta-schedule", "--class-cond")
    return parser


def _load_data(parser: argparse.ArgumentParser, args, image_size: int, channels: int) -> ImageData:
    try:
        return load_images(args.data, image_size, channels, n=args.num_images, seed=args.seed)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        parser.error(f"--data: {exc}")


def train_main(argv: list[str]) -> int:
    parser = _train_parser()
    args = parser.parse_args(argv)
    if args.sample_steps > args.num_train_timesteps:
        parser.error("--sample-steps cannot exceed --num-train-timesteps")
    channels = args.channels or (1 if args.data == "digits" else 3)
    image_size = args.image_size or PRESETS[args.config]["image_size"]
    with start_run(parser, args, recipe="ddpm", ops=OPS) as run:
        if args.warmup is None:  # (on --resume the run's own value is already here: start_run applied its flags)
            args.warmup = default_warmup(WARMUP, args.steps)
        data = _load_data(parser, args, image_size, channels)
        if args.class_cond and data.labels is None:
            parser.error(f"--class-cond: the data {args.data} has no labels (use a folder with one subfolder per "
                         "class)")
        overrides = dict(image_size=image_size, in_channels=channels,
                         num_classes=data.num_classes if args.class_cond else 0)
        if args.upsample:
            overrides["upsample"] = args.upsample
        if args.base_channels:
            overrides["base_channels"] = args.base_channels
        try:
            config = UNetConfig.preset(args.config, **overrides)
        except ValueError as exc:
            parser.error(f"--config {args.config} --image-size {image_size}: {exc}")
        scheduler_options = dict(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule,
                                 prediction_type=args.prediction, clip_sample=True)
        if run.resuming:
            saved = run.saved_config
            if saved.get("model") != config.to_dict() or saved.get("scheduler") != scheduler_options:
                parser.error(f"--resume: the checkpoint in {args.out} was trained with another UNet or schedule "
                             f"({saved.get('model')}, {saved.get('scheduler')}); pass the same options")
        return run.train(DDPMTask(run, config, scheduler_options, data))


class DDPMTask(TrainTask):
    log_every = LOG_EVERY

    def __init__(self, run: Run, config: UNetConfig, scheduler_options: dict, data: ImageData):
        args = run.args
        self.run, self.config, self.scheduler_options = run, config, scheduler_options
        self.model = UNet(config).to(run.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.scheduler = make_scheduler("ddpm", **scheduler_options)
        self.modules = {"model": self.model, "ema": self.ema}
        self.optimizers = {"model": torch.optim.AdamW(self.model.parameters(), lr=args.lr,
                                                      weight_decay=args.weight_decay)}
        self.ddp = run.dist.wrap(self.model)
        self.images, self.labels = data.images, data.labels if args.class_cond else None
        self.class_names = list(data.class_names) if args.class_cond else []

    def config_dict(self) -> dict:
        return {"model": self.config.to_dict(), "scheduler": self.scheduler_options,
                "class_names": self.class_names, "data": str(self.run.args.data), "seed": self.run.args.seed}

    def train_step(self, step: int) -> dict:
        run, args = self.run, self.run.args
        index = batch_indices(len(self.images), args.batch_size, batch_generator(args.seed, step))
        x0 = run.dist.shard(self.images[index]).to(run.device, non_blocking=True)
        y = run.dist.shard(self.labels[index]).to(run.device) if self.labels is not None else None
        optimizer = self.optimizers["model"]
        for group in optimizer.param_groups:
            group["lr"] = warmup_cosine_lr(step, base_lr=args.lr, warmup_steps=args.warmup, total_steps=args.steps,
                                           min_lr=args.lr * 0.1)
        loss = diffusion_loss(self.ddp, self.scheduler, x0, y, _step_generator(args.seed, step, run.dist.rank,
                                                                               run.device),
                              prediction=args.prediction, label_dropout=args.label_dropout)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip)
        optimizer.step()
        ema_update(self.ema, self.model, ema_decay(step, args.ema))
        return {"loss": loss.detach()}

    def _grid(self, path, progress: bool = False) -> None:
        run = self.run
        pipe = DiffusionPipeline(self.ema, make_scheduler("ddim", **self.scheduler_options))
        grid_labels = torch.arange(GRID_SIZE) % self.config.num_classes if self.config.num_classes else None
        generator = torch.Generator(run.device).manual_seed(run.args.seed)
        with run.autocast():
            images = pipe.sample(GRID_SIZE, run.args.sample_steps, class_labels=grid_labels, generator=generator,
                                 progress=progress)
        run.save_grid(images, path)

    def evaluate(self, step: int) -> bool:
        if self.run.dist.is_main:
            self._grid(self.run.samples_dir / f"step_{step:06d}.png")
        return False

    def finish(self, step: int, completed: bool) -> None:
        if self.run.dist.is_main and completed:
            self.run.log("writing the final sample grid")
            self._grid(self.run.samples_dir / "final.png", progress=self.run.verbose)
            self.run.say(f"samples: {self.run.samples_dir / 'final.png'}")


# ------------------------------------------------------------------------------------------------ sample
def load_ddpm(ckpt, device: torch.device | str = "cpu", *, use_ema: bool = True,
              allow_nonfinite: bool = False) -> tuple[UNet, dict]:
    """The UNet of a run folder (the training --out folder or its checkpoint/), EMA weights by default, and its
    config.json (``model``, ``scheduler`` options, ``class_names``)."""
    from genfast.models._checkpoint import read_run

    unet = UNet.from_checkpoint(ckpt, device, ema=use_ema, allow_nonfinite=allow_nonfinite)
    return unet, read_run(ckpt, "ddpm")[1]


def _sample_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="genfast sample ddpm", description="Images from a trained diffusion UNet.")
    add_sample_args(parser, ops=OPS)
    parser.add_argument("--n", type=positive_int, default=64, help="images (default 64)")
    parser.add_argument("--steps", type=positive_int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--scheduler", default="ddim", choices=tuple(SCHEDULERS))
    parser.add_argument("--eta", type=non_negative_float, default=0.0, help="DDIM noise (0: deterministic)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default 3 for class-conditional models; 1 = off)")
    parser.add_argument("--label", default=None,
                        help="class name to draw (class-conditional models; default: all classes in turn)")
    parser.add_argument("--no-ema", action="store_true", help="sample with the raw weights, not the EMA ones")
    parser.add_argument("--cuda-graph", action="store_true", help="replay each step as a CUDA graph (GPU only)")
    add_grid_args(parser, out="ddpm_samples.png", scale=3)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def sample_main(argv: list[str]) -> int:
    parser = _sample_parser()
    args = parser.parse_args(argv)
    device = sample_device(parser, args, OPS)
    if args.cuda_graph and device.type != "cuda":
        parser.error("--cuda-graph needs a CUDA device")
    unet, meta = load_or_exit(parser, lambda: load_ddpm(args.ckpt, device, use_ema=not args.no_ema,
                                                                allow_nonfinite=args.allow_nonfinite))
    names = meta.get("class_names") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        parser.error("--ckpt: its config.json's class_names is not a list of names")
    labels = None
    if names:
        if args.label is None:
            labels = torch.arange(args.n) % len(names)
        elif args.label in names:
            labels = torch.full((args.n,), names.index(args.label), dtype=torch.int64)
        else:
            parser.error(f"--label: unknown class {args.label!r}; known: {', '.join(names)}")
    elif args.label is not None:
        parser.error("--label: this model is unconditional (trained without --class-cond)")
    guidance = args.guidance if args.guidance is not None else (3.0 if names else 1.0)
    if guidance != 1.0 and not names:
        parser.error("--guidance: classifier-free guidance needs a class-conditional model (--class-cond)")
    try:
        pipe = DiffusionPipeline(unet, make_scheduler(args.scheduler, **meta["scheduler"]))
        generator = torch.Generator(device).manual_seed(args.seed)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        with autocast:
            images = backend_errors(parser, lambda: pipe.sample(
                args.n, args.steps, guidance_scale=guidance, class_labels=labels, generator=generator, eta=args.eta,
                progress=not args.quiet, cuda_graph=args.cuda_graph))
    except (ValueError, TypeError, KeyError) as exc:
        parser.error(str(exc))
    nrow = None
    if labels is not None and args.label is None:
        legend = f"classes in turn, row-major ({', '.join(names)}), guidance {guidance:g}"
    elif labels is not None:
        legend = f"{args.n} samples of class {args.label}, guidance {guidance:g}"
    else:
        legend = f"{args.n} samples ({args.scheduler}, {args.steps} steps, --seed {args.seed})"
    write_grid(parser, images, args.out, nrow=nrow, scale=args.scale, legend=legend)
    return 0
