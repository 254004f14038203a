"""Loading a model from the run folder that `genfast train <model>` wrote (see genfast.training.checkpoint for
the layout), without importing genfast.training: config.json and the weights are read through genfast._io.

The config is checked against the weights' shapes, read from the safetensors header, before any memory is
allocated for the model: a hostile config.json (a width of 10**9) cannot exhaust memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from genfast._io import load_safetensors_state, read_json_config, read_safetensors_header

FORMAT_VERSION = 2  # the same as genfast.training.checkpoint.FORMAT_VERSION (a test keeps them equal)
CHECKPOINT_DIR = "checkpoint"
CONFIG_FILE = "config.json"


def find_run_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder of a run folder (``path/checkpoint``, or ``checkpoint.old`` left by a crash mid-save)
    or of the checkpoint folder itself; FileNotFoundError if there is none."""
    path = Path(path)
    for candidate in (path / CHECKPOINT_DIR, path):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
        old = candidate.with_name(candidate.name + ".old")
        if not candidate.exists() and (old / CONFIG_FILE).is_file():
            return old
    raise FileNotFoundError(f"no checkpoint at {path} (expected {path / CHECKPOINT_DIR / CONFIG_FILE} "
                            "from `genfast train`)")


def read_run(path: str | os.PathLike, recipe: str | tuple[str, ...]) -> tuple[Path, dict]:
    """(checkpoint folder, its config.json) of a run folder whose recipe is ``recipe`` (or one of them);
    FileNotFoundError / ValueError naming the file otherwise (another model, an older format)."""
    directory = find_run_checkpoint(path)
    config = read_json_config(directory / CONFIG_FILE)
    where = directory / CONFIG_FILE
    recipes = (recipe,) if isinstance(recipe, str) else recipe
    if "format_version" not in config:
        run = directory.parent if directory.name.startswith(CHECKPOINT_DIR) else directory
        raise ValueError(f"{where} was written by an earlier genfast (before checkpoint format {FORMAT_VERSION}); "
                         f"convert it with `python -m genfast.training.convert {run}`")
    if config["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{where}: checkpoint format_version {config['format_version']!r}; this genfast reads "
                         f"{FORMAT_VERSION}")
    if config.get("recipe") not in recipes:
        raise ValueError(f"{path} holds a {config.get('recipe')!r} checkpoint, not a {' or '.join(recipes)} one")
    if not isinstance(config.get("model"), dict):
        raise ValueError(f"{where}: 'model' must be an object holding the model's config")
    return directory, config


def build_and_load(factory: Callable[[], nn.Module], directory: Path,
                   roles: str | dict[str, Callable[[nn.Module], nn.Module]]) -> nn.Module:
    """``factory()`` with the weights of ``directory/<role>.safetensors``, after checking on the meta device (no
    memory) that the parameter names and shapes are the files'. ``roles``: one role for the whole module, or
    role -> the part of the module it holds (e.g. ``{"generators": lambda m: m.generators, ...}``)."""
    parts = {roles: lambda m: m} if isinstance(roles, str) else roles
    with torch.device("meta"):
        shell = factory()
    for role, part in parts.items():
        path = directory / f"{role}.safetensors"
        expected = {name: tuple(t.shape) for name, t in part(shell).state_dict().items()}
        found = {name: info.shape for name, info in read_safetensors_header(path).items()}
        if expected != found:
            missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
            wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
            detail = "; ".join(text for text in (
                f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                f"{wrong[0]} is {list(found[wrong[0]])} in the file, {list(expected[wrong[0]])} for the config"
                if wrong else "") if text)
            raise ValueError(f"{path} does not fit the config in {directory / CONFIG_FILE}: {detail}")
    module = factory()
    for role, part in parts.items():
        part(module).load_state_dict(load_safetensors_state(directory / f"{role}.safetensors"))
    return module


__all__ = ["FORMAT_VERSION", "find_run_checkpoint", "read_run", "build_and_load"]
