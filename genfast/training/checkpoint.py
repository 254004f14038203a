"""Training checkpoints: a directory written atomically, loaded without trusting its author.

Layout of a run folder (``--out``) and of its checkpoint (format_version 2)::

    <out>/checkpoint/config.json         {"format_version": 2, "recipe": "<name>", "model": {...}, ...extras}
    <out>/checkpoint/<role>.safetensors  weights, one file per module ("model", or "generator", "ema" ...)
    <out>/checkpoint/trainer.pt          optimizer states, the step, RNG states (torch.save; loaded with
                                         weights_only=True, so no pickled code runs)
    <out>/checkpoint/<side files>        e.g. the tokenizer, written in the same atomic step as the weights
    <out>/samples/                       sample grids

Atomicity: everything is written into a temporary sibling directory (``.checkpoint.tmp-*``), which then replaces
the old checkpoint by two renames (old -> ``.checkpoint.genfast-old``, new -> ``checkpoint``). An interruption at
any moment leaves either the old or the new checkpoint complete; ``find_checkpoint`` recovers the displaced one only
when ``checkpoint`` itself is absent (the process died between the two renames), never in place of a broken one.
Files and folders are created with the user's umask.

What genfast deletes: only folders it can prove it made. Each folder it creates holds a marker file
(``.genfast-made``, JSON) and has a name a user would not pick (``.checkpoint.tmp-<random>``,
``.checkpoint.genfast-old``). A temporary folder's marker says the whole folder is genfast's; a committed
checkpoint's marker lists the files genfast wrote into it, and only those are removed when it is replaced: a folder
that still holds anything else (a user's NOTES.txt), has no marker, or is a symbolic link is never deleted but
renamed to a visible ``checkpoint.kept-<random>``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from genfast._io import load_safetensors_state, read_json_config, write_atomic
from genfast.models._checkpoint import (  # the run folder's vocabulary lives below training, shared with the loaders
    CHECKPOINT_DIR,
    CONFIG_FILE,
    DISPLACED_SUFFIX,
    FORMAT_VERSION,
    MADE_MARKER,
    check_weights,
    displaced_dir,
    genfast_marker,
)

TRAINER_FILE = "trainer.pt"
TMP_MARKER = ".tmp-"
KEPT_INFIX = ".kept-"  # `checkpoint.kept-<random>`: a replaced folder that held files genfast did not write


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
    from safetensors.torch import save

    # safetensors refuses tensors that share storage (tied weights): store each as its own contiguous copy.
    seen: dict[int, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        ptr = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        tensors[key] = tensor.to("cpu").clone().contiguous() if ptr in seen else tensor.to("cpu").contiguous()
        if ptr != -1:
            seen[ptr] = key
    # Bytes written by genfast's one writer, not save_file (which creates the file 0600): the user's umask.
    write_atomic(path, save(tensors))


def make_temp_dir(parent: Path, name: str) -> Path:
    """A new empty directory ``parent/.<name>.tmp-<random>`` (created with the user's umask; mkdtemp's is 0700)
    holding only the marker that says it is genfast's temporary folder (removable whole)."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = parent / f".{name}{TMP_MARKER}{secrets.token_hex(6)}"
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        _write_marker(tmp, None)
        return tmp


def _write_marker(folder: Path, files: list[str] | None) -> None:
    """The marker: files None for a temporary folder (all of it genfast's), else the names genfast wrote."""
    (folder / MADE_MARKER).write_text(json.dumps({"made_by": "genfast", "files": files}))


def remove_own_dir(folder: Path) -> bool:
    """Remove ``folder`` if genfast made it (its marker), deleting only the files genfast wrote there; True when
    it is gone. A folder without the marker, a symbolic link, or one that still holds other files is left."""
    made, files = genfast_marker(folder)
    if not made:
        return False
    if files is None:  # a temporary folder: all of it is genfast's (rmtree never follows links inside)
        shutil.rmtree(folder, ignore_errors=True)
        return not folder.exists()
    for name in [*files, MADE_MARKER]:
        child = folder / name
        if child.is_symlink() or child.is_file():  # unlink removes a link itself, never what it points to
            child.unlink(missing_ok=True)
    try:
        folder.rmdir()  # fails when anything else is in it: that is the user's, and stays
        return True
    except OSError:
        return False


def _discard(folder: Path) -> Path | None:
    """Remove genfast's folder ``folder``; what cannot be proved genfast's is renamed to a visible
    ``<name>.kept-<random>`` beside it instead (returned). Nothing that is not genfast's is ever deleted."""
    if not (folder.exists() or folder.is_symlink()) or remove_own_dir(folder):
        return None
    base = folder.name[1:-len(DISPLACED_SUFFIX)] if folder.name.endswith(DISPLACED_SUFFIX) else folder.name
    kept = folder.with_name(f"{base}{KEPT_INFIX}{secrets.token_hex(4)}")
    os.replace(folder, kept)
    return kept


def remove_stale_temp_dirs(parent: str | os.PathLike, name: str = CHECKPOINT_DIR) -> list[Path]:
    """Delete ``parent/.<name>.tmp-*`` folders left by a save that was killed; returns what was removed.

    Only folders with genfast's marker (or empty ones: killed before the marker was written) are removed, so
    nothing of the user's is touched even if it bears such a name."""
    parent = Path(parent)
    removed = []
    if parent.is_dir():
        for child in parent.iterdir():
            if not child.name.startswith(f".{name}{TMP_MARKER}") or child.is_symlink() or not child.is_dir():
                continue
            if remove_own_dir(child):
                removed.append(child)
            else:
                try:
                    child.rmdir()  # only if empty
                    removed.append(child)
                except OSError:
                    pass
    return removed


def save_checkpoint(directory: str | os.PathLike, *, modules: dict[str, nn.Module],
                    trainer_state: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
                    side_files: Callable[[Path], None] | None = None) -> Path:
    """Write a checkpoint directory atomically and return its path.

    modules: name -> module; each is saved as ``<name>.safetensors`` (DDP / compile wrappers are unwrapped).
    trainer_state: anything torch.save can write that ``torch.load(weights_only=True)`` reads back: tensors,
    numbers, strings, lists, dicts — optimizer.state_dict(), step counters, capture_rng_state().
    config: JSON-serialisable (the model config and recipe arguments).
    side_files: called with the folder being written, to add files (a tokenizer) that must change together with
    the weights.
    """
    if not modules:
        raise ValueError("modules: need at least one module to save")
    for name in modules:
        if not name.isidentifier():
            raise ValueError(f"modules: name {name!r} must be an identifier (it becomes a file name)")
    directory = Path(directory)
    tmp = make_temp_dir(directory.parent, directory.name)
    try:
        for name, module in modules.items():
            _write_safetensors(_unwrap(module).state_dict(), tmp / f"{name}.safetensors")
        torch.save(trainer_state or {}, tmp / TRAINER_FILE)
        write_atomic(tmp / CONFIG_FILE, json.dumps(config or {}, indent=2, sort_keys=True).encode())
        if side_files is not None:
            side_files(tmp)
        commit_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def commit_dir(tmp: Path, directory: Path) -> Path | None:
    """Put the finished folder ``tmp`` (from make_temp_dir beside ``directory``) in place of ``directory`` by two
    renames, so that an interruption leaves the old or the new one complete. The replaced folder is removed only
    as far as genfast wrote it (see the module docstring); returns where the rest was kept, if anything was.
    ValueError when ``directory`` is a symbolic link (genfast never replaces or follows one)."""
    if directory.is_symlink():
        raise ValueError(f"{directory} is a symbolic link; genfast does not write checkpoints through links "
                         "(replace it with a folder, or choose another --out)")
    _write_marker(tmp, sorted(p.name for p in tmp.iterdir() if p.name != MADE_MARKER))
    _fsync_tree(tmp)
    old = displaced_dir(directory)
    kept = None
    if directory.exists():  # (if only the displaced one exists, a crash mid-swap left it: keep it until the new
        kept = _discard(old)  # is in place)
        os.replace(directory, old)
    os.replace(tmp, directory)
    _fsync_dir(directory.parent)
    return _discard(old) or kept


def _fsync_tree(path: Path) -> None:
    for child in path.rglob("*"):
        if child.is_file():
            with open(child, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _resolve(directory: Path) -> Path | None:
    """``directory`` if it is a complete checkpoint; its displaced twin (genfast's, with the marker) if it is
    absent after a crash mid-swap; ValueError naming the missing file if it is a checkpoint with a file missing;
    else None."""
    old = displaced_dir(directory)
    old_is_ours = genfast_marker(old)[0]
    if not directory.exists():
        if old_is_ours and (old / CONFIG_FILE).is_file() and (old / TRAINER_FILE).is_file():
            return old
        return None
    if not directory.is_dir():
        return None
    has_config, has_trainer = (directory / CONFIG_FILE).is_file(), (directory / TRAINER_FILE).is_file()
    if has_config and has_trainer:
        return directory
    meant_as_checkpoint = has_trainer or directory.name == CHECKPOINT_DIR or old_is_ours or any(
        directory.glob("*.safetensors")) and has_config and _has_format_version(directory / CONFIG_FILE)
    if meant_as_checkpoint and (has_config or has_trainer or old_is_ours):
        missing = TRAINER_FILE if has_config else CONFIG_FILE
        raise ValueError(f"{directory / missing} is missing: the checkpoint in {directory} is incomplete "
                         "(copy the whole folder, or start again with --overwrite)")
    return None


def _has_format_version(path: Path) -> bool:
    try:
        return "format_version" in read_json_config(path)
    except (ValueError, FileNotFoundError):
        return False


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The complete checkpoint of ``path``: a run folder (``path/checkpoint``) or a checkpoint folder itself.

    None when there is none; ValueError naming the file when a checkpoint is there but incomplete."""
    path = Path(path)
    inner = path / CHECKPOINT_DIR
    if inner.exists() or displaced_dir(inner).exists():
        return _resolve(inner)
    return _resolve(path)


def read_checkpoint_config(directory: str | os.PathLike) -> dict:
    """The config.json of a complete checkpoint (``find_checkpoint``'s rules); FileNotFoundError if none."""
    found = find_checkpoint(directory)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {directory} (expected {CONFIG_FILE} and {TRAINER_FILE})")
    return read_json_config(found / CONFIG_FILE)


def load_checkpoint(directory: str | os.PathLike, *, modules: dict[str, nn.Module] | None = None,
                    map_location: str | torch.device = "cpu", strict: bool = True,
                    allow_nonfinite: bool = False) -> tuple[dict, dict]:
    """Load the weights of ``modules`` (in place) and return ``(trainer_state, config)``.

    ``directory`` is a run folder or a checkpoint folder. Raises FileNotFoundError when there is no checkpoint
    there and ValueError when a file is missing or unreadable or its weights do not fit the module: the loaders'
    one rule (genfast.models._checkpoint.check_weights) refuses another dtype kind and NaN/inf weights (unless
    ``allow_nonfinite``) and announces float casts.
    """

    found = find_checkpoint(directory)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {directory} (expected {CONFIG_FILE} and {TRAINER_FILE})")
    config = read_json_config(found / CONFIG_FILE)
    for name, module in (modules or {}).items():
        state = load_safetensors_state(found / f"{name}.safetensors")
        check_weights(state, _unwrap(module), found / f"{name}.safetensors", allow_nonfinite=allow_nonfinite)
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


__all__ = ["FORMAT_VERSION", "CHECKPOINT_DIR", "save_checkpoint", "load_checkpoint", "find_checkpoint",
           "read_checkpoint_config", "load_safetensors_state", "remove_stale_temp_dirs", "make_temp_dir",
           "commit_dir", "remove_own_dir", "displaced_dir", "MADE_MARKER"]
