"""Convert a run folder written by an earlier genfast (before checkpoint format 2) to today's layout.

    python -m genfast.training.convert runs/dcgan [runs/vae ...]

Earlier recipes wrote five config.json schemas, and the GANs kept their checkpoint files in the run folder itself.
This writes ``<run>/checkpoint/`` in format 2 (config.json with "format_version" and "recipe", the weights renamed
to today's roles, trainer.pt with the optimizers under "optimizers"), atomically; the old files are left where
they were (delete them when the converted run works). The GPT's tokenizer moves from ``<run>/tokenizer/`` into the
checkpoint. Nothing is executed from the old files: trainer.pt is read with weights_only=True.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from genfast._io import read_json_config
from genfast.training.checkpoint import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    FORMAT_VERSION,
    TRAINER_FILE,
    commit_dir,
    make_temp_dir,
)

GAN_RECIPES = ("numbergan", "dcgan", "cgan")


def _old_checkpoint(run: Path) -> Path:
    for candidate in (run / CHECKPOINT_DIR, run):
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
    tmp = make_temp_dir(run, CHECKPOINT_DIR)
    try:
        for stem, role in roles.items():
            shutil.copyfile(old / f"{stem}.safetensors", tmp / f"{role}.safetensors")
        torch.save({"recipe": recipe, **state}, tmp / TRAINER_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, "recipe": recipe,
                                                   **new_config}, indent=2, sort_keys=True))
        if recipe == "gpt":
            for child in (run / "tokenizer").iterdir():
                shutil.copyfile(child, tmp / child.name)
        commit_dir(tmp, run / CHECKPOINT_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run / CHECKPOINT_DIR


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
