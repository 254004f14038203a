"""Training checkpoints: a directory written atomically, loaded without trusting its author.

Layout of a checkpoint directory::

    config.json                      the model config and anything JSON the recipe wants back (``meta``)
    <name>.safetensors               one per module (weights only: safetensors cannot run code)
    trainer.pt                       optimizer / scheduler states, step counters, RNG states
                                     (torch.save; loaded with weights_only=True, so no pickled code runs)

Atomicity: everything is written into a temporary sibling directory, which then replaces the old checkpoint by
two renames (old -> ``<dir>.old``, new -> ``<dir>``). An interruption at any moment leaves either the old or
the new checkpoint complete; ``find_checkpoint`` also recovers the ``.old`` one if the process died between the
two renames.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.json"


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers, whose state_dict keys are the plain ones."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod") and isinstance(module._orig_mod, nn.Module):  # torch.compile
            module = module._orig_mod
        else:
            return module


def _write_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # safetensors refuses tensors that share storage (tied weights): store each as its own contiguous copy.
    seen: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        tensors[key] = tensor.to("cpu").clone().contiguous() if ptr in seen else tensor.to("cpu").contiguous()
        if ptr != -1:
            seen[ptr] = key
    save_file(tensors, str(path))


def load_safetensors_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file (raises FileNotFoundError / ValueError with the path)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def save_checkpoint(directory: str | os.PathLike, *, modules: dict[str, nn.Module],
                    trainer_state: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint directory atomically and return its path.

    modules: name -> module; each is saved as ``<name>.safetensors`` (DDP / compile wrappers are unwrapped).
    trainer_state: anything torch.save can write that ``torch.load(weights_only=True)`` reads back: tensors,
    numbers, strings, lists, dicts — optimizer.state_dict(), step counters, capture_rng_state().
    config: JSON-serialisable (the model config and recipe arguments).
    """
    if not modules:
        raise ValueError("modules: need at least one module to save")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        for name, module in modules.items():
            if not name.isidentifier():
                raise ValueError(f"modules: name {name!r} must be an identifier (it becomes a file name)")
            _write_safetensors(_unwrap(module).state_dict(), tmp / f"{name}.safetensors")
        torch.save(trainer_state or {}, tmp / TRAINER_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config or {}, indent=2, sort_keys=True))
        _fsync_dir(tmp)
        old = directory.with_name(directory.name + ".old")
        if directory.exists():  # (if only .old exists, a crash mid-swap left it: keep it until the new is in place)
            if old.exists():
                shutil.rmtree(old)
            os.replace(directory, old)
        os.replace(tmp, directory)
        _fsync_dir(directory.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir() if path.is_dir() else ():
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint at ``directory`` (or its ``.old`` twin after a crash mid-swap), else None."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / CONFIG_FILE).is_file() and (candidate / TRAINER_FILE).is_file():
            return candidate
    return None


def load_checkpoint(directory: str | os.PathLike, *, modules: dict[str, nn.Module] | None = None,
                    map_location: str | torch.device = "cpu", strict: bool = True) -> tuple[dict, dict]:
    """Load the weights of ``modules`` (in place) and return ``(trainer_state, config)``.

    Raises FileNotFoundError when there is no complete checkpoint at ``directory`` and ValueError when a file
    is unreadable or its weights do not fit the module (another architecture or config).
    """
    found = find_checkpoint(directory)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {directory} (expected {CONFIG_FILE} and {TRAINER_FILE})")
    try:
        config = json.loads((found / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{found / CONFIG_FILE} is not valid JSON: {exc}") from exc
    for name, module in (modules or {}).items():
        state = load_safetensors_state(found / f"{name}.safetensors")
        try:
            _unwrap(module).load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            raise ValueError(f"{found / (name + '.safetensors')} does not fit the {name} module "
                             f"(another architecture or config?): {exc}") from exc
    try:
        trainer_state = torch.load(found / TRAINER_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{found / TRAINER_FILE} could not be loaded safely: {exc}") from exc
    return trainer_state, config
