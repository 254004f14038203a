"""Convert a run folder written by an earlier genfast (before checkpoint format 2) to today's layout.

    python -m genfast.training.convert runs/dcgan [runs/vae ...]

Earlier recipes wrote five config.json schemas, and the GANs kept their checkpoint files in the run folder itself.
This writes ``<run>/checkpoint/`` in format 2 (config.json with "format_version" and "recipe", the weights renamed
to today's roles, trainer.pt with the optimizers under "optimizers"), atomically. Nothing is deleted or
overwritten: the GANs' old files stay where they are (a ``<run>/checkpoint/`` that is already there is refused), and
an old ``<run>/checkpoint/`` folder is renamed, with everything in it, to ``<run>/checkpoint-format1/`` (delete
either when the converted run works). The GPT's tokenizer file (``char_tokenizer.json`` or ``tokenizer.json``, the
names genfast writes) is copied from ``<run>/tokenizer/`` into the checkpoint; nothing else there is read, and a
symbolic link is refused rather than followed. Nothing is executed from the old files: trainer.pt is read with
weights_only=True.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import torch

from genfast._io import read_json_config
from genfast.data.tokenizers import BPE_FILE, CHAR_FILE
from genfast.training.checkpoint import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    FORMAT_VERSION,
    TRAINER_FILE,
    commit_dir,
    make_temp_dir,
)

GAN_RECIPES = ("numbergan", "dcgan", "cgan")
KEPT_DIR = "checkpoint-format1"  # where an old <run>/checkpoint/ goes, whole, when the new one takes its name
TOKENIZER_FILES = (CHAR_FILE, BPE_FILE)  # what genfast's tokenizers write; nothing else is copied


def _old_checkpoint(run: Path) -> Path:
    # (KEPT_DIR: a conversion killed between its two renames left the old checkpoint there and no new one.)
    candidates = (run / CHECKPOINT_DIR, run) if (run / CHECKPOINT_DIR).exists() else (run / KEPT_DIR, run)
    for candidate in candidates:
        if candidate.is_symlink():
            raise ValueError(f"{candidate} is a symbolic link; genfast converts only folders it can write beside")
        if (candidate / CONFIG_FILE).is_file() and (candidate / TRAINER_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"no checkpoint in {run} (expected {CONFIG_FILE} and {TRAINER_FILE} in {run} or "
                            f"{run / CHECKPOINT_DIR})")


def _plan(config: dict, trainer: dict, where: Path) -> tuple[str, dict, dict[str, str], dict]:
    """(recipe, new config, {old weights file stem: new role}, new trainer state) of an old checkpoint."""
    def opts(**names: str) -> dict:
        return {new: trainer[old] for new, old in names.items()}

    base = {"step": int(trainer["step"]), "rng": trainer.get("rng", {})}
    if config.get("recipe") in GAN_RECIPES:  # the GANs: files in the run folder
        recipe = config["recipe"]
        new = {"model": config["model"], "args": config.get("args", {})}
        state = {**base, "optimizers": opts(generator="opt_g", discriminator="opt_d"), "task": trainer.get("task", {})}
        return recipe, new, {"generator": "generator", "discriminator": "discriminator"}, state
    kind = config.get("model")
    if kind == "vae":
        new = {"model": config["config"], "data": config.get("data"), "seed": config.get("seed", 0)}
        return "vae", new, {"vae": "model"}, {**base, "optimizers": opts(model="optimizer")}
    if kind == "cyclegan":
        new = {"model": config["config"], **{k: config[k] for k in ("image_size", "pool_size", "data_a", "data_b",
                                                                     "seed") if k in config}}
        state = {**base, "optimizers": opts(generators="opt_g", discriminators="opt_d"),
                 "task": {"pools": trainer.get("pools", [])}}
        return "cyclegan", new, {"generators": "generators", "discriminators": "discriminators"}, state
    if kind == "ddpm":
        new = {"model": config["unet"], **{k: config[k] for k in ("scheduler", "class_names", "data", "seed")
                                           if k in config}}
        return "ddpm", new, {"unet": "model", "ema": "ema"}, {**base, "optimizers": opts(model="optimizer")}
    if config.get("architecture") == "transformer":
        new = {"model": config["model_config"], "tokenizers": config["tokenizers"], "args": config.get("args", {})}
        return "translator", new, {"model": "model"}, {**base, "optimizers": opts(model="optimizer")}
    if isinstance(kind, dict) and "n_layer" in kind:
        new = {"model": kind, "tokenizer": config.get("tokenizer"), "args": config.get("args", {})}
        return "gpt", new, {"model": "model"}, {**base, "optimizers": opts(model="optimizer")}
    raise ValueError(f"{where / CONFIG_FILE}: not a checkpoint genfast's earlier recipes wrote")


def convert_run(run: str | Path) -> Path:
    """Write ``<run>/checkpoint`` in format 2 from the earlier layout in ``run``; returns the checkpoint folder."""
    run = Path(run)
    old = _old_checkpoint(run)
    config = read_json_config(old / CONFIG_FILE)
    if config.get("format_version") == FORMAT_VERSION:
        raise ValueError(f"{old / CONFIG_FILE} is already in format {FORMAT_VERSION}")
    try:
        trainer = torch.load(old / TRAINER_FILE, map_location="cpu", weights_only=True)
        recipe, new_config, roles, state = _plan(config, trainer, old)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{old}: cannot convert this checkpoint ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # torch.load refusing pickled code, or a corrupt file
        raise ValueError(f"{old / TRAINER_FILE} could not be loaded safely: {exc}") from exc
    target = run / CHECKPOINT_DIR
    keep_old_at = run / KEPT_DIR if old == target else None
    if keep_old_at is None and (target.exists() or target.is_symlink()):
        raise ValueError(f"{target} already exists and is not this run's old checkpoint; move it away first "
                         "(the converter never replaces a folder it did not write)")
    if keep_old_at is not None and (keep_old_at.exists() or keep_old_at.is_symlink()):
        raise ValueError(f"{keep_old_at} already exists; the old checkpoint is kept under that name during the "
                         "conversion: move it away first")
    tokenizer = _tokenizer_file(run) if recipe == "gpt" else None
    tmp = make_temp_dir(run, CHECKPOINT_DIR)
    try:
        for stem, role in roles.items():
            _copy_regular_file(old / f"{stem}.safetensors", tmp / f"{role}.safetensors")
        if tokenizer is not None:
            _copy_regular_file(tokenizer, tmp / tokenizer.name)
        torch.save({"recipe": recipe, **state}, tmp / TRAINER_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, "recipe": recipe,
                                                   **new_config}, indent=2, sort_keys=True))
        if keep_old_at is not None:
            os.rename(target, keep_old_at)  # the whole old folder, user files included, under a new name
        commit_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _tokenizer_file(run: Path) -> Path:
    """The tokenizer file genfast wrote in ``<run>/tokenizer/`` (by its name; a link or anything else refused)."""
    folder = run / "tokenizer"
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_symlink():
            raise ValueError(f"{path} is a symbolic link; the converter copies only regular files genfast wrote")
        if path.is_file():
            return path
    raise FileNotFoundError(f"no tokenizer in {folder} (expected {' or '.join(TOKENIZER_FILES)})")


def _copy_regular_file(source: Path, dest: Path) -> None:
    """Copy ``source`` to the new file ``dest``: never through a symbolic link, never over an existing file."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if source.is_symlink():
            raise ValueError(f"{source} is a symbolic link; the converter copies only regular files") from exc
        raise
    with os.fdopen(fd, "rb") as src:
        if not stat.S_ISREG(os.fstat(src.fileno()).st_mode):
            raise ValueError(f"{source} is not a regular file")
        out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(out, "wb") as dst:
            shutil.copyfileobj(src, dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genfast.training.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (the --out of an earlier `genfast train`)")
    args = parser.parse_args(argv)
    status = 0
    for run in args.runs:
        try:
            print(f"{run}: converted to {convert_run(run)}")
        except (FileNotFoundError, ValueError, OSError) as exc:
            print(f"{run}: error: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
