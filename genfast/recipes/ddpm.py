"""`genfast train ddpm` and `genfast sample ddpm`: a diffusion UNet on shapes, digits or a folder of images.

    genfast train ddpm --data shapes --config 32 --steps 20000 --out runs/ddpm
    genfast train ddpm --data digits --class-cond --label-dropout 0.1 --prediction v_prediction --out runs/digits
    genfast sample ddpm --ckpt runs/digits --n 64 --steps 50 --scheduler ddim --guidance 3.0 --label 7 --out 7s.png

Training: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps at a uniformly drawn timestep, and the UNet learns eps
(``--prediction epsilon``) or v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 (``v_prediction``) with a mean squared
error; AdamW with a warmup and cosine decay; EMA weights (``--ema``) are kept, saved and used for every
sample. Writes <out>/checkpoint (atomic; ``--resume`` continues bit for bit: the data, noise, timesteps and
label dropout of a step are pure functions of the seed and the step), a PNG grid of EMA samples every
--sample-every steps (<out>/samples/step_<N>.png) and <out>/samples.png at the end. Ctrl-C saves, then stops.
Under torchrun each process takes its slice of every global batch (DDP); on a GPU it trains in bf16 autocast.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import genfast
from genfast.data.images import ImageData, batch_indices, load_images
from genfast.diffusion.pipeline import SCHEDULERS, DiffusionPipeline, make_scheduler
from genfast.models.unet import PRESETS, UNet, UNetConfig
from genfast.recipes._common import (
    add_common_train_args,
    autocast,
    check_positive,
    checkpoint_and_sample,
    checkpoint_config,
    start_run,
)
from genfast.training import (
    StopOnInterrupt,
    batch_generator,
    capture_rng_state,
    find_checkpoint,
    load_checkpoint,
    progress_bar,
    restore_rng_state,
    save_checkpoint,
    save_image_grid,
    warmup_cosine_lr,
)

PREDICTIONS = ("epsilon", "v_prediction")
GRID_SIZE = 16
LOG_EVERY = 10  # steps between reading the loss on the host (a GPU synchronisation)


# ------------------------------------------------------------------------------------------------ the loss
def velocity(scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The v-prediction target ``sqrt(a_t) * noise - sqrt(1 - a_t) * x0`` (Salimans & Ho 2022), float32."""
    a = scheduler.alphas_cumprod.to(x0.device)[timesteps].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()


def diffusion_loss(unet: nn.Module, scheduler, x0: torch.Tensor, labels: torch.Tensor | None,
                   generator: torch.Generator | None, *, prediction: str = "epsilon",
                   label_dropout: float = 0.0) -> torch.Tensor:
    """The mean squared error of one training batch x0 [B, C, H, W] (labels [B] or None).

    Noise, timesteps and label dropout come from ``generator`` (on x0's device), in that order. ``unet`` may
    be wrapped (DDP); label dropout needs the plain UNet's null class, found through ``.module``.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    plain = unet.module if isinstance(unet, nn.parallel.DistributedDataParallel) else unet
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    t = torch.randint(0, len(scheduler), (x0.shape[0],), generator=generator, device=x0.device)
    if labels is not None and label_dropout > 0:
        labels = plain.drop_labels(labels, label_dropout, generator=generator)
    x_t = scheduler.add_noise(x0, noise, t)
    target = noise if prediction == "epsilon" else velocity(scheduler, x0, noise, t)
    with autocast(x0.device):
        pred = unet(x_t, t, labels)
    return F.mse_loss(pred.float(), target.float())


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
    parser = argparse.ArgumentParser(prog="genfast train ddpm", description="Train a diffusion UNet (DDPM).")
    add_common_train_args(parser, steps=20000, batch_size=64, lr=2e-4, out="runs/ddpm")
    parser.add_argument("--data", default="shapes", help="shapes (default), digits, or a folder of images")
    parser.add_argument("--config", default="32", choices=tuple(PRESETS), help="UNet size (default 32)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the config's (32, 64 or 8)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="image channels (default: 1 for digits, 3 otherwise)")
    parser.add_argument("--num-images", type=int, default=2048, help="images drawn for --data shapes")
    parser.add_argument("--base-channels", type=int, default=None, help="UNet width (default: the config's)")
    parser.add_argument("--upsample", default=None, choices=("conv_transpose", "nearest"),
                        help="UNet upsampling (default: the config's, a transposed convolution)")
    parser.add_argument("--prediction", default="epsilon", choices=PREDICTIONS)
    parser.add_argument("--num-train-timesteps", type=int, default=1000)
    parser.add_argument("--beta-schedule", default="linear", choices=("linear", "squaredcos_cap_v2"))
    parser.add_argument("--ema", type=float, default=0.999, help="EMA decay of the sampling weights")
    parser.add_argument("--class-cond", action="store_true", help="condition on the data's class labels")
    parser.add_argument("--label-dropout", type=float, default=0.1,
                        help="probability of training a label as the null class (classifier-free guidance)")
    parser.add_argument("--warmup", type=int, default=200, help="learning-rate warmup steps")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the sample grids")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="save and stop after this step (split a run of --steps over jobs; --resume goes on)")
    return parser


def _load_data(parser: argparse.ArgumentParser, args, image_size: int, channels: int) -> ImageData:
    try:
        return load_images(args.data, image_size, channels, n=args.num_images, seed=args.seed)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        parser.error(f"--data: {exc}")


def train_main(argv: list[str]) -> int:
    parser = _train_parser()
    args = parser.parse_args(argv)
    check_positive(parser, args, "steps", "batch_size", "lr", "save_every", "sample_every", "num_images",
                   "num_train_timesteps", "sample_steps")
    if not 0.0 <= args.ema < 1.0:
        parser.error(f"--ema must be in [0, 1), got {args.ema}")
    if not 0.0 <= args.label_dropout < 1.0:
        parser.error(f"--label-dropout must be in [0, 1), got {args.label_dropout}")
    if args.stop_at is not None and args.stop_at < 1:
        parser.error(f"--stop-at must be >= 1, got {args.stop_at}")
    if args.sample_steps > args.num_train_timesteps:
        parser.error("--sample-steps cannot exceed --num-train-timesteps")
    channels = args.channels or (1 if args.data == "digits" else 3)
    image_size = args.image_size or PRESETS[args.config]["image_size"]
    data = _load_data(parser, args, image_size, channels)
    if args.class_cond and data.labels is None:
        parser.error(f"--class-cond: the data {args.data} has no labels (use a folder with one subfolder per class)")
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
    meta = {"model": "ddpm", "unet": config.to_dict(), "scheduler": scheduler_options,
            "class_names": list(data.class_names) if args.class_cond else [], "data": str(args.data),
            "seed": args.seed}
    if args.resume:
        found = find_checkpoint(args.out / "checkpoint")
        if found is None:
            parser.error(f"--resume: no checkpoint in {args.out}")
        _, saved = load_checkpoint(found)
        if saved.get("model") != "ddpm" or saved.get("unet") != meta["unet"] or \
                saved.get("scheduler") != meta["scheduler"]:
            parser.error(f"--resume: the checkpoint in {args.out} was trained with another UNet or schedule "
                         f"({saved.get('unet')}, {saved.get('scheduler')}); pass the same options")
    dist = start_run(args)
    try:
        if args.batch_size % dist.world_size:
            parser.error(f"--batch-size {args.batch_size} must divide by the {dist.world_size} processes")
        return _train(args, config, scheduler_options, data, meta, dist)
    finally:
        dist.close()


def _train(args, config: UNetConfig, scheduler_options: dict, data: ImageData, meta: dict, dist) -> int:
    device = dist.device
    model = UNet(config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    scheduler = make_scheduler("ddpm", **scheduler_options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    ckpt_dir, samples_dir = args.out / "checkpoint", args.out / "samples"
    step = 0
    if args.resume:
        state, _ = load_checkpoint(ckpt_dir, modules={"unet": model, "ema": ema}, map_location=device)
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        restore_rng_state(state["rng"])
    ddp = dist.wrap(model)
    images, labels = data.images, data.labels if args.class_cond else None

    def save() -> None:
        if dist.is_main:
            save_checkpoint(ckpt_dir, modules={"unet": model, "ema": ema}, config=meta,
                            trainer_state={"step": step, "optimizer": optimizer.state_dict(),
                                           "rng": capture_rng_state()})
        dist.barrier()

    def sample_grid(path: Path) -> None:
        pipe = DiffusionPipeline(ema, make_scheduler("ddim", **scheduler_options))
        grid_labels = torch.arange(GRID_SIZE) % config.num_classes if config.num_classes else None
        generator = torch.Generator(device).manual_seed(args.seed)
        with autocast(device):
            images_out = pipe.sample(GRID_SIZE, args.sample_steps, class_labels=grid_labels, generator=generator)
        save_image_grid(images_out, path)

    bar = progress_bar(args.steps, initial=step, desc="ddpm", enabled=dist.is_main and not args.quiet)
    with StopOnInterrupt() as stop:
        while step < args.steps:
            index = batch_indices(len(images), args.batch_size, batch_generator(args.seed, step))
            x0 = dist.shard(images[index]).to(device, non_blocking=True)
            y = dist.shard(labels[index]).to(device) if labels is not None else None
            for group in optimizer.param_groups:
                group["lr"] = warmup_cosine_lr(step, base_lr=args.lr, warmup_steps=args.warmup,
                                               total_steps=args.steps, min_lr=args.lr * 0.1)
            loss = diffusion_loss(ddp, scheduler, x0, y, _step_generator(args.seed, step, dist.rank, device),
                                  prediction=args.prediction, label_dropout=args.label_dropout)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            ema_update(ema, model, ema_decay(step, args.ema))
            step += 1
            bar.update(1)
            if step % LOG_EVERY == 0 or step == args.steps:
                value = dist.mean(loss.detach())
                if not math.isfinite(value):
                    print(f"genfast train ddpm: the loss is {value} at step {step}; stopping (lower --lr?)",
                          file=sys.stderr)
                    return 1
                bar.set_postfix(loss=f"{value:.4f}")
            stopping = dist.any(stop.requested) or step == args.stop_at
            if checkpoint_and_sample(step, args, dist, stopping=stopping, save=save, sample_grid=sample_grid,
                                     samples_dir=samples_dir):
                break
    bar.close()
    if dist.is_main and step >= args.steps:
        sample_grid(args.out / "samples.png")
        print(f"checkpoint: {ckpt_dir}\nsamples: {args.out / 'samples.png'}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------ sample
def load_ddpm(ckpt: str | Path, device: torch.device | str = "cpu", *, use_ema: bool = True) -> tuple[UNet, dict]:
    """The UNet of a checkpoint folder (the training --out folder or its checkpoint/), EMA weights by default,
    and its saved metadata (``unet``, ``scheduler`` options, ``class_names``)."""
    directory, meta = checkpoint_config(ckpt, "ddpm", "DDPM")
    unet = UNet(UNetConfig.from_dict(meta["unet"]))
    load_checkpoint(directory, modules={"ema" if use_ema else "unet": unet})
    return unet.to(device).eval(), meta


def _sample_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genfast sample ddpm", description="Images from a trained diffusion UNet.")
    parser.add_argument("--ckpt", type=Path, required=True, help="the --out folder of training, or its checkpoint")
    parser.add_argument("--n", type=int, default=64, help="images (default 64)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    parser.add_argument("--scheduler", default="ddim", choices=tuple(SCHEDULERS))
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0: deterministic)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default 3 for class-conditional models; 1 = off)")
    parser.add_argument("--label", default=None,
                        help="class name to draw (class-conditional models; default: all classes in turn)")
    parser.add_argument("--no-ema", action="store_true", help="sample with the raw weights, not the EMA ones")
    parser.add_argument("--cuda-graph", action="store_true", help="replay each step as a CUDA graph (GPU only)")
    parser.add_argument("--out", type=Path, default=Path("ddpm_samples.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default=None, choices=genfast.BACKENDS)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def sample_main(argv: list[str]) -> int:
    parser = _sample_parser()
    args = parser.parse_args(argv)
    check_positive(parser, args, "n", "steps")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.backend:
        genfast.set_backend(args.backend)
    try:
        unet, meta = load_ddpm(args.ckpt, device, use_ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(f"--ckpt: {exc}")
    names = meta.get("class_names") or []
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
        with autocast(device):
            images = pipe.sample(args.n, args.steps, guidance_scale=guidance, class_labels=labels,
                                 generator=generator, eta=args.eta, progress=not args.quiet,
                                 cuda_graph=args.cuda_graph)
    except ValueError as exc:
        parser.error(str(exc))
    path = save_image_grid(images, args.out)
    print(f"wrote {path}", file=sys.stderr)
    return 0
