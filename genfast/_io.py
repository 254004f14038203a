"""Reading files a user hands to genfast (weights, configs), which are untrusted, and writing files atomically.

The bottom layer: imports only torch, safetensors and json, so that models and training share one reader and
one writer.

- ``load_safetensors_state(path)``: the tensors of a .safetensors file (no code runs: safetensors holds data only).
- ``read_safetensors_header(path)``: each tensor's dtype and shape, read from the file's header without loading
  any weight, so a loader can compare a config with the weights before it allocates a model.
- ``read_json_config(path)``: a JSON object from a config file, with bounded size, nesting and integers; every
  error is a ValueError/FileNotFoundError naming the file (and the key where one is at fault).
- ``check_fits_memory(nbytes, what)``: refuse, before allocating, what a config or a file header asks for beyond
  this machine's memory (``machine_memory_bytes()``), in one line naming ``what``.
- ``write_atomic(path, data)``: replace ``path`` with ``data`` so that a reader (or a crash) sees the old file or
  the new one, never a part of it.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import struct
from pathlib import Path
from typing import NamedTuple

import torch

# Bounds on what a reader accepts before it parses: generous for any real file, small enough that a hostile
# one cannot exhaust memory or the interpreter's stack.
MAX_JSON_BYTES = 16 * 2**20
MAX_JSON_DEPTH = 32
MAX_SAFETENSORS_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
# JSON integers beyond int64 are no size, count or seed genfast takes; Python would parse a 4300-digit one (and
# refuse a longer one without naming the key), so they are refused with the key named.
MAX_JSON_INT = 2**63 - 1
# safetensors dtype names -> bytes per element.
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                           "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class TensorInfo(NamedTuple):
    """One tensor of a safetensors header: its dtype name (``"F32"``, ``"BF16"`` ...) and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _existing_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    return path


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """{name: TensorInfo(dtype, shape)} of every tensor in a .safetensors file, reading only its header.

    The header is checked as safetensors would (size, JSON, dtypes, shapes, offsets inside the file), so what
    this returns describes tensors the file really holds. ValueError naming the file otherwise.
    """
    path = _existing_file(path, "weights file")
    size = path.stat().st_size
    where = f"{path} is not a readable safetensors file"
    with path.open("rb") as fh:
        prefix = fh.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{where}: shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_SAFETENSORS_HEADER_BYTES or 8 + n > size:
            raise ValueError(f"{where}: its header claims {n} bytes (file size {size})")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{where}: its header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise ValueError(f"{where}: its header is not a JSON object")
    data_bytes = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        bad = f"{where}: tensor {name!r} has a malformed entry {str(entry)[:200]}"
        if not isinstance(entry, dict):
            raise ValueError(bad)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in SAFETENSORS_DTYPE_BYTES or not isinstance(shape, list) or not isinstance(offsets, list):
            raise ValueError(bad)
        if not all(type(s) is int and s >= 0 for s in shape) or len(offsets) != 2 \
                or not all(type(o) is int for o in offsets):
            raise ValueError(bad)
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes or end - begin != math.prod(shape) * SAFETENSORS_DTYPE_BYTES[dtype]:
            raise ValueError(f"{where}: tensor {name!r} ({dtype} {shape}) does not fit its offsets {offsets} "
                             f"in {data_bytes} bytes of data")
        out[name] = TensorInfo(dtype, tuple(shape))
    return out


def load_safetensors_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file (FileNotFoundError / ValueError naming the path)."""
    path = _existing_file(path, "weights file")
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from exc


def _depth(value, limit: int) -> int:
    """Nesting depth of parsed JSON, without recursion (a hostile file can nest thousands deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if deepest > limit:
                return deepest
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


class _HugeInt:
    """What the JSON parser leaves for an integer beyond MAX_JSON_INT, so the key holding it can be named."""

    def __init__(self, digits: int):
        self.digits = digits


def _parse_int(text: str) -> int | _HugeInt:
    digits = len(text.lstrip("-"))
    if digits > 19 or abs(int(text)) > MAX_JSON_INT:  # 19 digits: int() stays far below Python's digit limit
        return _HugeInt(digits)
    return int(text)


def _huge_int_key(value, prefix: str = "") -> tuple[str, _HugeInt] | None:
    """(dotted key, the _HugeInt) of the first integer beyond MAX_JSON_INT in parsed JSON, without recursion."""
    stack = [(prefix, value)]
    while stack:
        key, item = stack.pop()
        if isinstance(item, _HugeInt):
            return key, item
        if isinstance(item, dict):
            stack.extend((f"{key}.{k}" if key else str(k), v) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((f"{key}[{i}]", v) for i, v in enumerate(item))
    return None


def machine_memory_bytes() -> int:
    """This machine's physical memory in bytes (the bound for what an untrusted config may ask to allocate)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): no bound rather than a wrong one
        return 2**62


def check_fits_memory(nbytes: int, what: str) -> None:
    """ValueError (one line, starting with ``what``) if ``nbytes`` exceed this machine's memory; call it with the
    size a config or a header implies before allocating it."""
    memory = machine_memory_bytes()
    if nbytes > memory:
        raise ValueError(f"{what} needs {nbytes / 2**30:,.1f} GiB, more than this machine's "
                         f"{memory / 2**30:,.1f} GiB of memory")


def read_json_config(path: str | os.PathLike, *, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """The JSON object in ``path``: ValueError naming the file if it is too large, not JSON, not an object,
    nested deeper than ``max_depth`` or holding an integer beyond int64 (naming its key); FileNotFoundError if
    missing. Check each key's type where it is used."""
    path = _existing_file(path, "config file")
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{path}: a config of {size} bytes is larger than the {MAX_JSON_BYTES} genfast reads")
    try:
        value = json.loads(path.read_bytes(), parse_int=_parse_int)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ValueError(f"{path} is nested too deeply to be a config") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object ({{...}}), got a {type(value).__name__}")
    if _depth(value, max_depth) > max_depth:
        raise ValueError(f"{path} is nested more than {max_depth} levels deep; not a config genfast reads")
    huge = _huge_int_key(value)
    if huge is not None:
        raise ValueError(f"{path}: key {huge[0]!r} is an integer of {huge[1].digits} digits, beyond the int64 range "
                         "of any size or count genfast reads")
    return value


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path: the bytes go to a temporary file in the same
    folder (so the rename stays on one filesystem), reach the disk (fsync), then replace ``path`` in one rename.
    On any failure the temporary file is removed and ``path`` is left as it was.

    The file gets the user's umask (0o666 masked, as any file they write; mkstemp's would be 0600). The temporary
    name starts with a dot and ends with ``.tmp``, beside the file it becomes."""
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:  # another writer's temporary file: draw another name
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


__all__ = ["TensorInfo", "load_safetensors_state", "read_safetensors_header", "read_json_config", "check_fits_memory",
           "machine_memory_bytes", "write_atomic"]
