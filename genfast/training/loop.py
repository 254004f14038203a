"""The one training loop of every `genfast train <model>`.

A recipe (genfast/recipes/<model>.py) parses its flags, asks :func:`start_run` for a :class:`Run`, builds its
model(s) and optimizer(s) (from ``run.saved_config`` when resuming), describes them as a :class:`TrainTask`, and
hands that to ``run.train(task)``::

    def train_main(argv):
        parser = argparse.ArgumentParser(prog="genfast train mymodel")
        add_train_args(parser, recipe="mymodel", steps=1000, batch_size=64, lr=1e-3, ops=("conv_transpose2d",))
        parser.add_argument("--width", type=positive_int, default=32)          # the recipe's own flags
        args = parser.parse_args(argv)
        with start_run(parser, args, recipe="mymodel", ops=("conv_transpose2d",)) as run:
            config = MyConfig.from_dict(run.saved_config["model"]) if run.resuming else MyConfig(width=args.width)
            return run.train(MyTask(run, config))

    class MyTask(TrainTask):
        def __init__(self, run, config):
            self.run, self.config = run, config
            self.model = MyModel(config).to(run.device)
            self.modules = {"model": self.model}                      # saved as <role>.safetensors
            self.optimizers = {"model": torch.optim.Adam(self.model.parameters(), lr=run.args.lr)}
            self.ddp = run.dist.wrap(self.model)

        def config_dict(self):                                          # config.json: {"model": ..., extras}
            return {"model": self.config.to_dict()}

        def train_step(self, step):                                     # one optimizer step
            x = self.run.dist.shard(batch_of(step)).to(self.run.device)   # a pure function of (seed, step)
            with self.run.autocast():
                loss = self.ddp(x)
            opt = self.optimizers["model"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss.detach()}                              # shown on the bar, checked for NaN

        def evaluate(self, step):                                       # every --sample-every steps and the last
            self.run.save_grid(..., self.run.samples_dir / f"step_{step:06d}.png")  # small images enlarged
            return False                                                # True: stop early (and save)

What the loop owns, so that every recipe behaves alike:
- the --out folder: checked usable at the start (before any data loads), stale temporary checkpoint folders of
  genfast's own removed, an existing checkpoint never replaced without --resume or --overwrite (a usage error that
  names both), nothing written there but ``checkpoint/`` and ``samples/``;
- resume: config.json's ``format_version`` and ``recipe``, trainer.pt's keys and step checked (a clear error naming
  the file), optimizers, RNG states and the task's extra state restored, "resumed from step N" printed;
- the progress bar (losses read every ``task.log_every`` steps: reading waits for the device), the --save-every
  and --sample-every cadence, --stop-after, Ctrl-C, SIGTERM and SIGHUP (finish the step, save, write its samples,
  exit 130);
- --out locked for the run (an flock on ``.genfast-lock``, holding the pid: a second run into it is refused);
- the NaN policy: a non-finite loss stops training with exit status 1 and a message, and nothing is saved after
  it, so the last good checkpoint stays;
- atomic checkpoints in the run folder layout of genfast.training.checkpoint (with the task's side files);
- DDP (through ``run.dist``: each rank takes ``dist.shard`` of every global batch), bf16 autocast on CUDA
  (``run.autocast()``), and "saved step N in <dir>" at every stop.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import genfast
from genfast._backend import BackendError
from genfast._io import read_json_config
from genfast.models._checkpoint import check_run_config
from genfast.training.checkpoint import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    FORMAT_VERSION,
    MADE_MARKER,
    TRAINER_FILE,
    find_checkpoint,
    load_checkpoint,
    make_temp_dir,
    remove_own_dir,
    remove_stale_temp_dirs,
    save_checkpoint,
)
from genfast.training.distributed import Distributed
from genfast.training.images import grid_scale, save_image_grid
from genfast.training.interrupt import StopOnInterrupt
from genfast.training.options import check_backend, resolve_device
from genfast.training.progress import progress_bar
from genfast.training.rng import capture_rng_state, check_rng_state, restore_rng_state, seed_everything

SAMPLES_DIR = "samples"
INTERRUPTED_EXIT = 130  # what a shell reports for a process stopped by Ctrl-C


class TrainTask:
    """What one recipe contributes to the loop (subclass it; see the module docstring).

    modules: role -> module, each saved as ``<role>.safetensors`` (a DDP wrapper is unwrapped on save).
    optimizers: name -> optimizer, saved and restored with the checkpoint.
    log_every: steps between reading the losses on the host (the bar, the NaN check); also at every save.
    """

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    log_every: int = 1

    def config_dict(self) -> dict[str, Any]:
        """config.json's content besides format_version and recipe: ``{"model": <the config's dict>, ...}``."""
        raise NotImplementedError

    def train_step(self, step: int) -> dict[str, torch.Tensor | float]:
        """Run optimizer step ``step`` (0-based) and return the figures to show (each checked to be finite)."""
        raise NotImplementedError

    def evaluate(self, step: int) -> bool:
        """Every --sample-every steps and at the last step: write samples / print an eval. True stops early."""
        return False

    def finish(self, step: int, completed: bool) -> None:
        """After the loop (completed: --steps reached): final grids and the like."""

    def state_dict(self) -> dict[str, Any]:
        """Extra state for trainer.pt (image pools, early-stopping counters); weights_only-loadable values."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def write_side_files(self, directory: Path) -> None:
        """Write files that belong with the weights (a tokenizer) into the checkpoint folder being written."""


class _Diverged(Exception):
    pass


class _SaveFailed(Exception):
    pass


def _one_line(exc: BaseException) -> str:
    """An OSError as "<strerror> (<file>)", anything else as its first line: no traceback reaches the user."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f" ({exc.filename})" if exc.filename else "")
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class Run:
    """One training run: its flags, process group, --out folder and, when resuming, the saved checkpoint."""

    def __init__(self, args: argparse.Namespace, recipe: str, dist: Distributed, saved_config: dict | None,
                 trainer_state: dict | None, checkpoint_found: Path | None):
        self.args, self.recipe, self.dist = args, recipe, dist
        self.saved_config, self.trainer_state, self.checkpoint_found = saved_config, trainer_state, checkpoint_found
        self.out = Path(args.out)
        self._bar = None
        self.recorded_flags: tuple[str, ...] = ()  # the dests saved as config.json's "flags" (see start_run)

    @property
    def resuming(self) -> bool:
        return self.saved_config is not None

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def checkpoint_dir(self) -> Path:
        return self.out / CHECKPOINT_DIR

    @property
    def samples_dir(self) -> Path:
        return self.out / SAMPLES_DIR

    @property
    def verbose(self) -> bool:
        return self.dist.is_main and not self.args.quiet

    def save_grid(self, images: torch.Tensor, path: str | Path, *, nrow: int | None = None) -> Path:
        """A training sample grid (usually under samples_dir), small images enlarged (images.grid_scale)."""
        return save_image_grid(images, path, nrow=nrow, scale=grid_scale(images))

    def autocast(self):
        """bf16 autocast on CUDA (what the recipes train in on a GPU); nothing on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def log(self, message: str) -> None:
        """A line on stderr from the main process (not with --quiet), above the progress bar."""
        if self.verbose:
            (self._bar.write if self._bar is not None else _stderr)(message)

    def say(self, message: str) -> None:
        """A line on stderr from the main process, even with --quiet (where things were saved, resume)."""
        if self.dist.is_main:
            _stderr(message)

    # ------------------------------------------------------------------------------------------- the loop
    def train(self, task: TrainTask) -> int:
        """Train ``task`` to --steps (or --stop-after, Ctrl-C, an early stop); returns the exit status."""
        try:
            return self._train(task)
        finally:
            self.dist.unwrap(task)  # free the DDP wrappers before the process group closes

    def _train(self, task: TrainTask) -> int:
        args, dist = self.args, self.dist
        step = self._restore(task) if self.resuming else 0
        if self.resuming:
            self.say(f"resumed from step {step} ({self.checkpoint_found})")
        end = args.steps if args.stop_after is None else min(args.steps, step + args.stop_after)
        # "flags": the run's resolved flags, which a --resume takes for those it is not given (exact resume).
        config = {"format_version": FORMAT_VERSION, "recipe": self.recipe, **task.config_dict(),
                  "flags": {dest: _jsonable(getattr(args, dest)) for dest in self.recorded_flags}}
        saved_at = step if self.resuming else None
        losses: dict[str, Any] = {}

        def check(at: int) -> None:
            figures = {name: dist.mean(value.detach() if isinstance(value, torch.Tensor) else value)
                       for name, value in losses.items()}
            if not all(math.isfinite(v) for v in figures.values()):
                raise _Diverged(f"{', '.join(f'{k} {v:.4g}' for k, v in figures.items())} at step {at}")
            if self._bar is not None:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in figures.items()})

        def save(at: int) -> None:
            nonlocal saved_at
            trainer = {"recipe": self.recipe, "step": at, "rng": capture_rng_state(), "task": task.state_dict(),
                       "optimizers": {name: opt.state_dict() for name, opt in task.optimizers.items()}}
            failure = None
            if dist.is_main:
                try:
                    save_checkpoint(self.checkpoint_dir, modules=task.modules, trainer_state=trainer, config=config,
                                    side_files=task.write_side_files)
                except (OSError, RuntimeError) as exc:  # a full disk: OSError ENOSPC, or torch.save's RuntimeError
                    failure = f"could not save step {at} in {self.checkpoint_dir}: {_one_line(exc)}"
            # Every rank learns of a failed save (the others would wait for rank 0 at the next collective forever).
            if dist.any(failure is not None):
                raise _SaveFailed(failure or f"rank 0 could not save step {at}")
            saved_at = at

        def kept_text() -> str:
            return f"the last good checkpoint (step {saved_at}) stays in {self.checkpoint_dir}" \
                if saved_at is not None else "no checkpoint was written"

        interrupted = stopped_early = False
        self._bar = progress_bar(args.steps, initial=step, desc=f"train {self.recipe}", enabled=self.verbose)
        try:
            with StopOnInterrupt() as stop:
                while step < end:
                    losses = task.train_step(step)
                    step += 1
                    self._bar.update(1)
                    checked = False
                    if step % task.log_every == 0 or step % args.save_every == 0 or step == end:
                        check(step)
                        checked = True
                    evaluated = step % args.sample_every == 0 or step == args.steps
                    if evaluated:
                        stopped_early = bool(task.evaluate(step)) and step < args.steps
                    interrupted = dist.any(stop.requested)
                    if step % args.save_every == 0 or step == end or stopped_early or interrupted:
                        if not checked:
                            check(step)
                        save(step)
                    if interrupted and not evaluated:  # after the save: a second Ctrl-C here loses nothing
                        task.evaluate(step)  # the interrupted run's last state gets its sample grid too
                    if stopped_early or interrupted:
                        break
        except _Diverged as exc:
            self._close_bar()
            self.say(f"genfast train {self.recipe}: error: non-finite loss ({exc}); stopped, {kept_text()}. "
                     "Try a lower --lr.")
            return 1
        except (_SaveFailed, OSError) as exc:  # a full disk (at a save or a sample grid), a vanished folder
            self._close_bar()
            text = str(exc) if isinstance(exc, _SaveFailed) else _one_line(exc)
            self.say(f"genfast train {self.recipe}: error: {text}; stopped, {kept_text()}")
            return 1
        except BackendError as exc:
            self._close_bar()
            self.say(f"genfast train {self.recipe}: error: --backend {args.backend}: {exc}")
            return 2
        self._close_bar()
        task.finish(step, completed=step >= args.steps)
        why = " (interrupted)" if interrupted else " (stopped early)" if stopped_early else \
            " (--stop-after; continue with --resume)" if step < args.steps else ""
        if saved_at is not None:
            self.say(f"{self.recipe}: saved step {saved_at}{why} in {self.checkpoint_dir}")
        return INTERRUPTED_EXIT if interrupted else 0

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _restore(self, task: TrainTask) -> int:
        """Load weights, optimizers, RNG and the task's state from the checkpoint; returns the step."""
        state = self.trainer_state
        where = self.checkpoint_found / TRAINER_FILE
        try:
            load_checkpoint(self.checkpoint_found, modules=task.modules, map_location=self.device,
                            allow_nonfinite=bool(getattr(self.args, "allow_nonfinite", False)))
        except (ValueError, FileNotFoundError) as exc:  # a weights file missing, foreign, NaN, another dtype kind
            raise SystemExit(f"genfast train {self.recipe}: error: --resume: {exc}") from None
        saved_opts = state["optimizers"]
        if set(saved_opts) != set(task.optimizers):
            raise SystemExit(f"genfast train {self.recipe}: error: --resume: {where} holds optimizers "
                             f"{sorted(saved_opts)}, this run has {sorted(task.optimizers)}")
        field = "task"
        try:
            for name, opt in task.optimizers.items():
                field = f"optimizers.{name}"
                opt.load_state_dict(saved_opts[name])
                _check_optimizer_state(opt, field)
            field = "task"
            task.load_state_dict(state.get("task") or {})
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as exc:
            raise SystemExit(f"genfast train {self.recipe}: error: --resume: {where}: {field} does not fit this "
                             f"run: {_one_line(exc)}") from None
        step = state["step"]
        if self.dist.is_main:
            restore_rng_state(state["rng"])
        else:  # other ranks' RNG is not saved: reseed as a function of the step
            seed_everything((self.args.seed * 1_000_003 + step) * 4099 + self.dist.rank)
        return step


def _check_optimizer_state(opt: torch.optim.Optimizer, field: str) -> None:
    """ValueError naming ``field`` when a restored per-parameter state tensor (Adam's moments ...) has another shape
    than its parameter: load_state_dict does not check, and the first step would fail with a torch traceback."""
    index = 0
    for group in opt.param_groups:
        for param in group["params"]:
            for key, value in opt.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"{field}.state[{index}].{key} has shape {list(value.shape)}, the parameter "
                                     f"{list(param.shape)}")
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != param.dtype \
                        and value.dim() > 0:
                    raise ValueError(f"{field}.state[{index}].{key} is {value.dtype}, the parameter {param.dtype}")
            index += 1


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- start_run
LOCK_FILE = ".genfast-lock"  # in --out: flock'ed for the run's whole life, holds the running process's pid


def _is_main_process() -> bool:
    """Rank 0 of torchrun (or a plain process): the one that owns --out (its lock, its cleanup, its saves)."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def _lock_out(parser: argparse.ArgumentParser, out: Path) -> int | None:
    """An exclusive flock on ``out/.genfast-lock`` (the kernel drops it when the process ends, even by SIGKILL), with
    this process's pid written in; a usage error naming the process that holds it. Returns the lock's fd."""
    if fcntl is None:  # not a POSIX system: no lock, as before
        return None
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        parser.error(f"--out {out} is in use by another genfast run (process {holder}); wait for it to end, or "
                     "choose another --out")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _prepare_out(parser: argparse.ArgumentParser, out: Path) -> int | None:
    """Make --out (and check it is writable) before any data loads, lock it, and remove genfast's stale temporary
    folders; returns the lock's fd (None on the other ranks of torchrun, which leave the folder to rank 0)."""
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = make_temp_dir(out, CHECKPOINT_DIR)  # a real write: os.access says yes to root on read-only mounts
        remove_own_dir(probe)
        lock = _lock_out(parser, out) if _is_main_process() else None
    except OSError as exc:
        parser.error(f"--out {out} is not a folder genfast can write: {exc.strerror or exc}")
    try:
        inner = out / CHECKPOINT_DIR
        if inner.is_symlink():
            parser.error(f"--out {out}: {inner} is a symbolic link; genfast writes checkpoints only into a real "
                         "folder (replace the link with the folder, or choose another --out)")
        if inner.is_dir() and not (inner / MADE_MARKER).is_file() and not (inner / CONFIG_FILE).is_file():
            parser.error(f"--out {out}: {inner} is a folder genfast did not write; move it away or choose another "
                         "--out (genfast replaces its checkpoint folder at every save)")
        if lock is not None:
            remove_stale_temp_dirs(out, CHECKPOINT_DIR)
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    return lock


def check_checkpoint_config(config: dict, path: Path, recipe: str) -> None:
    """ValueError unless ``config`` (read from ``path``) is a format-2 checkpoint of ``recipe``: the loaders' one
    rule (genfast.models._checkpoint.check_run_config), and for an older format the way out --resume adds."""
    try:
        check_run_config(config, path.parent, recipe)
    except ValueError as exc:
        if "format_version" not in config:
            raise ValueError(f"{exc}, or start afresh with --overwrite") from None
        raise


TRAINER_KEYS = ("recipe", "step", "optimizers", "rng", "task")  # what Run.train's save writes into trainer.pt


def _read_trainer_state(path: Path, recipe: str) -> dict:
    """trainer.pt, every field checked (a hand-edited file is refused naming the field, never half-used)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} could not be loaded safely: {str(exc).splitlines()[0]}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a dict of trainer state")
    missing = [key for key in TRAINER_KEYS[:4] if key not in state]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not a genfast trainer state")
    unknown = sorted(str(key) for key in state if key not in TRAINER_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown field {unknown[0]!r} (a genfast trainer state holds "
                         f"{', '.join(TRAINER_KEYS)})")
    if state["recipe"] != recipe:
        raise ValueError(f"{path} is the trainer state of a {state['recipe']!r} run, not a {recipe} one")
    step = state["step"]
    if type(step) is not int or step < 0:
        raise ValueError(f"{path}: step must be an int >= 0, got {step!r}")
    optimizers = state["optimizers"]
    if not isinstance(optimizers, dict):
        raise ValueError(f"{path}: optimizers must be a dict, got {type(optimizers).__name__}")
    for name, saved in optimizers.items():
        if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) \
                or not isinstance(saved.get("param_groups"), list):
            raise ValueError(f"{path}: optimizers.{name} is not an optimizer's state_dict (state, param_groups)")
    if not isinstance(state.get("task", {}), dict):
        raise ValueError(f"{path}: task must be a dict, got {type(state['task']).__name__}")
    try:
        check_rng_state(state["rng"])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return state


# Flags that are not the run's (where it runs, how it reports, how this invocation stops): never saved or compared.
UNRECORDED_FLAGS = frozenset({"help", "out", "resume", "overwrite", "quiet", "device", "backend", "stop_after",
                              "allow_nonfinite"})


def _recorded_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> the option that sets it, for the flags config.json records (an alias with a suppressed default,
    like gpt's --eval-every, gives way to the flag it stands for)."""
    found: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if action.option_strings and action.dest not in UNRECORDED_FLAGS and action.dest != argparse.SUPPRESS and (
                action.dest not in found or found[action.dest].default is argparse.SUPPRESS):
            found[action.dest] = action
    return found


def _jsonable(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value


def _apply_saved_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, saved: dict) -> list[str]:
    """--resume: a flag left at its default takes the run's saved value (the run continues exactly as it began); a
    flag given with another value is refused if it is fixed by the run (architecture, data: mark_fixed), else
    applied and returned as "--lr 5 (the run had 0.001)" to be announced."""
    explicit = getattr(parser, "explicit", None)  # None: a plain argparse parser, whose values all count as given
    changes = []
    for dest, action in _recorded_flags(parser).items():
        if dest not in saved:
            continue
        current, before = _jsonable(getattr(args, dest, None)), saved[dest]
        if current == before:
            continue
        flag = action.option_strings[-1]
        if explicit is not None and dest not in explicit:
            setattr(args, dest, Path(before) if isinstance(action.default, Path) and isinstance(before, str)
                    else before)
        elif getattr(action, "fixed_on_resume", False):
            parser.error(f"--resume: {flag} {current} differs from the run's {before}, and {flag} is fixed by the "
                         "run (drop it to continue the run, or start a new run in another --out)")
        else:
            changes.append(f"{flag} {current} (the run had {before})")
    return changes


class start_run(contextlib.AbstractContextManager):
    """``with start_run(parser, args, recipe=..., ops=...) as run:``: check the common flags and the --out folder
    (usage errors through ``parser.error``), read the checkpoint to resume, join torchrun's process group, seed and
    choose the backend. Leaving the block leaves the process group.

    ops: the public genfast ops the model calls (checked against --backend on the device).
    """

    def __init__(self, parser: argparse.ArgumentParser, args: argparse.Namespace, *, recipe: str,
                 ops: tuple[str, ...] = ()):
        device = resolve_device(parser, args.device)
        check_backend(parser, args.backend, device, ops)
        if args.resume and args.overwrite:
            parser.error("--resume and --overwrite contradict each other: continue the run, or start it over")
        self._lock = _prepare_out(parser, Path(args.out))
        try:
            self._open(parser, args, recipe, device)
        except BaseException:  # a usage error after the lock was taken: free --out at once (tests run in-process)
            self._unlock()
            raise

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _open(self, parser: argparse.ArgumentParser, args: argparse.Namespace, recipe: str,
              device: torch.device) -> None:
        out = Path(args.out)
        try:
            found = find_checkpoint(out)
        except ValueError as exc:
            parser.error(str(exc))
        saved_config = trainer_state = None
        changes: list[str] = []
        if found is not None and not args.resume and not args.overwrite:
            parser.error(f"--out {out} already holds a checkpoint ({found}): pass --resume to continue that run, "
                         "--overwrite to start over, or another --out")
        if args.resume:
            if found is None:
                parser.error(f"--resume: no checkpoint in {out}")
            try:
                saved_config = read_json_config(found / CONFIG_FILE)
                check_checkpoint_config(saved_config, found / CONFIG_FILE, recipe)
                trainer_state = _read_trainer_state(found / TRAINER_FILE, recipe)
            except (ValueError, FileNotFoundError) as exc:
                parser.error(f"--resume: {exc}")
            flags = saved_config.get("flags")
            changes = _apply_saved_flags(parser, args, flags) if isinstance(flags, dict) else []
            if trainer_state["step"] > args.steps:
                parser.error(f"--resume: the checkpoint is at step {trainer_state['step']}, past --steps "
                             f"{args.steps}")
        dist = Distributed.from_environment(device)
        if args.batch_size % dist.world_size:
            dist.close()
            parser.error(f"--batch-size {args.batch_size} must be divisible by the {dist.world_size} processes")
        seed_everything(args.seed + dist.rank)
        # The backend holds for the run and is put back after it (a Python caller's choice is not changed).
        self._backend = genfast.backend(args.backend or genfast.get_backend())
        self._backend.__enter__()
        self.run = Run(args, recipe, dist, saved_config, trainer_state, found)
        self.run.recorded_flags = tuple(_recorded_flags(parser))
        if saved_config is not None and changes:
            self.run.say(f"--resume: changed from the run: {', '.join(changes)}")

    def __enter__(self) -> Run:
        return self.run

    def __exit__(self, *exc) -> None:
        self._backend.__exit__(None, None, None)
        self.run.dist.close(clean=exc[0] is None)
        self._unlock()


__all__ = ["TrainTask", "Run", "start_run", "check_checkpoint_config", "SAMPLES_DIR", "INTERRUPTED_EXIT"]
