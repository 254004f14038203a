"""Loading a model from the run folder that `genfast train <model>` wrote (see genfast.training.checkpoint for
the layout), without importing genfast.training: config.json and the weights are read through genfast._io.

The config is checked against the weights' shapes, read from the safetensors header, before any memory is
allocated for the model: a hostile config.json (a width of 10**9) cannot exhaust memory.

``check_weights`` is the one rule for the values of a loaded state dict (dtype kinds, casts, non-finite values):
every loader here calls it, and so does training's ``--resume``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from genfast._io import (
    SAFETENSORS_DTYPE_BYTES,
    check_fits_memory,
    load_safetensors_state,
    read_json_config,
    read_safetensors_header,
)

FORMAT_VERSION = 2  # of a run folder's config.json; the one definition (training writes it, every loader reads it)
CHECKPOINT_DIR = "checkpoint"
CONFIG_FILE = "config.json"
MADE_MARKER = ".genfast-made"  # inside every folder genfast creates: the proof that it may remove it
DISPLACED_SUFFIX = ".genfast-old"  # `.checkpoint.genfast-old`: the replaced checkpoint, between the two renames

log = logging.getLogger("genfast")


class CheckpointError(ValueError):
    """A weights file whose tensors do not fit the model (dtype kind, non-finite values): a ValueError, so the CLI
    ends it in one line, with the file and the tensor named."""


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    return "float" if dtype.is_floating_point else "integer"


def _count_nonfinite(tensor: torch.Tensor) -> int:
    if tensor.element_size() == 1:  # float8: torch has no isfinite for it on CPU; widen a slice at a time
        flat = tensor.reshape(-1)
        return sum(int((~torch.isfinite(flat[i:i + 2**22].float())).sum()) for i in range(0, flat.numel(), 2**22))
    return int((~torch.isfinite(tensor)).sum())


def check_weights(state: Mapping[str, torch.Tensor], model: nn.Module | Mapping[str, torch.Tensor],
                  source: str | os.PathLike, *, allow_nonfinite: bool = False) -> None:
    """Check the tensors read from a weights file before they are copied into ``model``; call it between reading
    ``state`` and ``model.load_state_dict(state)`` (the model may still be on the meta device: only dtypes are read).

    - A tensor whose dtype kind (float, integer, bool, complex) differs from the model's tensor of the same name is
      refused: load_state_dict would cast int64 or bool weights to float without a word. Same-kind integers pass
      (BatchNorm's int64 ``num_batches_tracked``).
    - A float-to-float change (bf16 or fp16 in the file, fp32 in the model ...) is allowed and announced in one
      warning line on the ``genfast`` logger, once per call, counting the tensors per (file, model) dtype pair.
    - A tensor holding NaN or +-inf is refused, naming it, unless ``allow_nonfinite=True`` (for debugging a run that
      diverged; the CLI's ``--allow-nonfinite``).

    ``model``: the module, or its ``state_dict()``. Names the model does not have are left to load_state_dict's
    ``strict`` check. ``source``: the file, for the messages. Raises CheckpointError (a ValueError) naming
    ``source`` and the tensor.
    """
    if not isinstance(allow_nonfinite, bool):
        raise TypeError(f"allow_nonfinite must be a bool, got {type(allow_nonfinite).__name__}")
    expected = model.state_dict() if isinstance(model, nn.Module) else model
    casts: dict[tuple[torch.dtype, torch.dtype], int] = {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{source}: {name!r} is a {type(tensor).__name__}, not a tensor")
        target = expected.get(name)
        if target is not None:
            have, want = _dtype_kind(tensor.dtype), _dtype_kind(target.dtype)
            if have != want:
                raise CheckpointError(f"{source}: tensor {name!r} is {str(tensor.dtype).replace('torch.', '')} "
                                      f"({have}) in the file, but the model's is "
                                      f"{str(target.dtype).replace('torch.', '')} ({want}); genfast does not "
                                      "convert between kinds")
            if tensor.dtype != target.dtype:
                casts[tensor.dtype, target.dtype] = casts.get((tensor.dtype, target.dtype), 0) + 1
        if not allow_nonfinite and (tensor.is_floating_point() or tensor.is_complex()):
            bad = _count_nonfinite(tensor)
            if bad:
                raise CheckpointError(f"{source}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf) of "
                                      f"{tensor.numel()}; refused (allow_nonfinite=True, or --allow-nonfinite, "
                                      "loads them for debugging)")
    if casts:
        pairs = ", ".join(f"{n} {str(a).replace('torch.', '')} -> {str(b).replace('torch.', '')}"
                          for (a, b), n in casts.items())
        log.warning("genfast: %s: weights cast to the model's dtype (%s tensors)", source, pairs)


def displaced_dir(directory: Path) -> Path:
    """Where a checkpoint save moves the folder it replaces until the new one is in place."""
    return directory.with_name(f".{directory.name}{DISPLACED_SUFFIX}")


def genfast_marker(folder: Path) -> tuple[bool, list[str] | None]:
    """(made by genfast, the files it wrote or None for all) of ``folder``, reading its marker without following
    links; (False, None) when there is no readable marker."""
    path = folder / MADE_MARKER
    try:
        if folder.is_symlink() or not folder.is_dir() or not path.is_file() or path.is_symlink():
            return False, None
        data = json.loads(path.read_text()[:1_000_000])
    except (OSError, ValueError):
        return False, None
    if not isinstance(data, dict) or data.get("made_by") != "genfast":
        return False, None
    files = data.get("files")
    if files is None:
        return True, None
    if not isinstance(files, list) or not all(isinstance(f, str) and f and "/" not in f and f not in (".", "..")
                                              for f in files):
        return False, None
    return True, files


def find_run_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder of a run folder (``path/checkpoint``, or the displaced ``.checkpoint.genfast-old`` that
    genfast marked as its own, left by a crash between a save's two renames) or of the checkpoint folder itself;
    FileNotFoundError if there is none. A user's folder (no marker) is never read in place of the checkpoint."""
    path = Path(path)
    for candidate in (path / CHECKPOINT_DIR, path):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
        old = displaced_dir(candidate)
        if not candidate.exists() and genfast_marker(old)[0] and (old / CONFIG_FILE).is_file():
            return old
    raise FileNotFoundError(f"no checkpoint at {path} (expected {path / CHECKPOINT_DIR / CONFIG_FILE} "
                            "from `genfast train`)")


def read_run(path: str | os.PathLike, recipe: str | tuple[str, ...]) -> tuple[Path, dict]:
    """(checkpoint folder, its config.json) of a run folder whose recipe is ``recipe`` (or one of them);
    FileNotFoundError / ValueError naming the file otherwise (another model, an older format)."""
    directory = find_run_checkpoint(path)
    config = read_json_config(directory / CONFIG_FILE)
    check_run_config(config, directory, recipe, path)
    return directory, config


def short(value: object) -> str:
    """A value read from an untrusted file, cut to fit in a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_run_config(config: dict, directory: Path, recipe: str | tuple[str, ...],
                     path: str | os.PathLike | None = None) -> None:
    """ValueError naming ``directory``'s config.json and the key at fault unless ``config`` (read from it) is
    of this genfast's format, written by ``recipe`` (or one of them), with a ``model`` object. ``path``: what
    the user named (the run folder), for the messages; default ``directory``."""
    where = directory / CONFIG_FILE
    path = directory if path is None else path
    recipes = (recipe,) if isinstance(recipe, str) else recipe
    if "format_version" not in config:
        run = directory.parent if directory.name.startswith(CHECKPOINT_DIR) else directory
        raise ValueError(f"{where} was written by an earlier genfast (before checkpoint format {FORMAT_VERSION}); "
                         f"convert it with `python -m genfast.training.convert {run}`")
    version = config["format_version"]
    if version != FORMAT_VERSION:
        raise ValueError(f"{where}: key 'format_version' is {short(version)}; this genfast reads checkpoint "
                         f"format_version {FORMAT_VERSION}")
    if config.get("recipe") not in recipes:
        found = str(config.get("recipe"))[:60]
        wanted = f"not a {' or '.join(recipes)} one" if recipes else "which genfast does not know"
        raise ValueError(f"{path} holds a {found!r} checkpoint, {wanted} ({where}: key 'recipe' is {found!r})")
    if not isinstance(config.get("model"), dict):
        raise ValueError(f"{where}: key 'model' must be an object holding the model's config, got "
                         f"{short(config.get('model'))}")


# Tensor factories whose size arguments the build budget reads before the call, so that a config asking for a
# tensor of 10**18 elements is refused before torch computes (and overflows) its storage size.
_SIZED_FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn})


def _requested_numel(args: tuple, kwargs: dict) -> int | None:
    """The element count a sized factory call asks for (Python ints: no overflow), or None if not readable."""
    size = kwargs.get("size", args[0] if len(args) == 1 or (args and not isinstance(args[0], int)) else args)
    if isinstance(size, int):
        size = (size,)
    if not isinstance(size, (tuple, list, torch.Size)) or not all(isinstance(d, int) for d in size):
        return None
    return math.prod(size)


class _BuildBudget(TorchFunctionMode):
    """While a model is built on the meta device: refuse (before it runs) the tensor that takes the count of
    tensors or elements past what the weights file holds, with generous slack (temporaries, non-persistent
    buffers). A model whose config matches the file never comes near it; one with 100000 layers stops after a
    few, instead of spending minutes building them; one as wide as 10**9 stops before its storage overflows.

    The slack: building genfast's models at their default sizes creates 0.5-1.2x the file's tensors and 1.0-1.9x
    its elements (1.9: a masked convolution's non-persistent mask), so 4x leaves room for models to come."""

    def __init__(self, tensors: int, numel: int, refuse: Callable[[], Exception]):
        super().__init__()
        self.tensors_left, self.numel_left, self.refuse = 4 * tensors + 64, 4 * numel + 2**24, refuse

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SIZED_FACTORIES:
            n = _requested_numel(args, kwargs)
            self.tensors_left -= 1
            self.numel_left -= 0 if n is None else n
            if self.tensors_left < 0 or self.numel_left < 0:
                raise self.refuse()
        return func(*args, **kwargs)


def _largest_sizes(model_config: object, largest_dim: int, tensors: int) -> str:
    """The config's int sizes that no tensor of the file shows (the likely culprits), else its two largest."""
    if not isinstance(model_config, dict):
        return ""
    sizes = {f"model.{k} = {v}": v for k, v in model_config.items() if isinstance(v, int) and not isinstance(v, bool)}
    for k, v in model_config.items():  # a list (channel multipliers, levels): its largest entry and its length
        if isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            sizes[f"model.{k} holds {max(v)}"] = max(v)
            sizes[f"model.{k} has {len(v)} entries"] = len(v)
    ranked = sorted(sizes.items(), key=lambda kv: -kv[1])
    culprits = [kv for kv in ranked if kv[1] > max(largest_dim, tensors)] or ranked[:2]
    return ", ".join(text for text, _ in culprits)


def build_and_load(factory: Callable[[], nn.Module], directory: Path,
                   roles: str | dict[str, Callable[[nn.Module], nn.Module]], *,
                   allow_nonfinite: bool = False) -> nn.Module:
    """``factory()`` with the weights of ``directory/<role>.safetensors``, after checking that the config fits
    them, before anything of the model's size is allocated or built:

    1. the headers are read (no weights), and the model is built on the meta device (no memory) under a budget
       taken from them, so a config of 100000 layers or a width of 10**9 is refused in a second, naming the
       config's sizes at fault;
    2. the parameter names and shapes must be the files', and loading must fit this machine's memory;
    3. the values pass ``check_weights`` (dtype kinds, non-finite values unless ``allow_nonfinite``).

    ``roles``: one role for the whole module, or role -> the part of the module it holds (e.g.
    ``{"generators": lambda m: m.generators, ...}``). Every error is a ValueError naming the file."""
    parts = {roles: lambda m: m} if isinstance(roles, str) else roles
    headers = {role: read_safetensors_header(directory / f"{role}.safetensors") for role in parts}
    infos = [info for header in headers.values() for info in header.values()]
    largest_dim = max((d for info in infos for d in info.shape), default=0)

    def too_large() -> ValueError:
        model_config = read_json_config(directory / CONFIG_FILE).get("model")
        files = ", ".join(f"{role}.safetensors" for role in parts)
        return ValueError(f"{directory / CONFIG_FILE}: the model it describes is larger than its weights ({files}: "
                          f"{len(infos)} tensors, {sum(i.numel for i in infos):,} values, no dimension above "
                          f"{largest_dim}): {_largest_sizes(model_config, largest_dim, len(infos))}; refused before "
                          "building it")

    with torch.device("meta"), _BuildBudget(len(infos), sum(i.numel for i in infos), too_large):
        shell = factory()
    needed = 0
    for role, part in parts.items():
        path = directory / f"{role}.safetensors"
        model_state = part(shell).state_dict()
        expected = {name: tuple(t.shape) for name, t in model_state.items()}
        found = {name: info.shape for name, info in headers[role].items()}
        if expected != found:
            missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
            wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
            detail = "; ".join(text for text in (
                f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
                f"{wrong[0]} is {list(found[wrong[0]])} in the file, {list(expected[wrong[0]])} for the config"
                if wrong else "") if text)
            raise ValueError(f"{path} does not fit the config in {directory / CONFIG_FILE}: {detail}")
        # The file's tensors and the model's are both in memory while load_state_dict copies one into the other.
        needed += sum(info.numel * SAFETENSORS_DTYPE_BYTES[info.dtype] for info in headers[role].values())
        needed += sum(t.numel() * t.element_size() for t in model_state.values())
    if needed:
        biggest = max(((name, info) for header in headers.values() for name, info in header.items()),
                      key=lambda item: item[1].numel)
        check_fits_memory(needed, f"{directory}: loading the model (largest tensor {biggest[0]!r}, "
                                  f"{list(biggest[1].shape)})")
    states = {}
    for role, part in parts.items():
        path = directory / f"{role}.safetensors"
        states[role] = load_safetensors_state(path)
        check_weights(states[role], part(shell), path, allow_nonfinite=allow_nonfinite)
    module = factory()
    for role, part in parts.items():
        part(module).load_state_dict(states[role])
    return module


__all__ = ["FORMAT_VERSION", "CheckpointError", "check_weights", "find_run_checkpoint", "displaced_dir",
           "genfast_marker", "read_run", "check_run_config", "build_and_load", "short"]
