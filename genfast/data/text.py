"""Training text for the language models: a user's file, or by default Python's own standard library source.

The standard library's .py files are present wherever Python is, so ``genfast train gpt`` works offline on any
machine without a download. They are read in a fixed order (sorted names, directory by directory) and capped
in size, so the same Python version always gives the same text.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Iterator

DEFAULT_MAX_CHARS = 2_000_000
# Third-party packages live under the standard library directory on some layouts; they are not "Python's own".
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_directory() -> Path:
    """The directory of the standard library's source (where ``os.py`` lives)."""
    for candidate in (sysconfig.get_paths().get("stdlib"), os.path.dirname(os.__file__)):
        if candidate and (Path(candidate) / "os.py").is_file():
            return Path(candidate)
    raise FileNotFoundError("the Python standard library's source was not found (no os.py beside the os module); "
                            "pass a text file with --data")


def stdlib_source_files(directory: str | os.PathLike | None = None) -> Iterator[Path]:
    """The .py files under the standard library directory, lazily, in a fixed order: each directory's files
    sorted by name, then its subdirectories in sorted order (so the first files come without a full walk)."""
    root = Path(directory) if directory is not None else stdlib_directory()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def stdlib_text(max_chars: int = DEFAULT_MAX_CHARS, directory: str | os.PathLike | None = None) -> str:
    """The standard library's source files concatenated (files that are not UTF-8 skipped), cut at ``max_chars``.

    Deterministic for a given Python installation: files in ``stdlib_source_files`` order, separated by a blank
    line.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars must be an int >= 1, got {max_chars!r}")
    parts, total = [], 0
    for path in stdlib_source_files(directory):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately in other encodings
        if not text.strip():
            continue
        parts.append(text if text.endswith("\n") else text + "\n")
        total += len(parts[-1]) + 1
        if total >= max_chars:
            break
    if not parts:
        raise FileNotFoundError("no readable .py files in the standard library directory; pass --data FILE")
    return "\n".join(parts)[:max_chars]


def read_text_file(path: str | os.PathLike, max_chars: int | None = None) -> str:
    """The text of a user's UTF-8 file; clear errors when it is missing, empty, or not UTF-8."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data: no file at {path}")
    if not path.is_file():
        raise ValueError(f"data: {path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"data: {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from exc
    if not text.strip():
        raise ValueError(f"data: {path} is empty")
    if "\x00" in text:
        raise ValueError(f"data: {path} holds NUL bytes: a binary file, not text")
    return text if max_chars is None else text[:max_chars]


__all__ = ["stdlib_directory", "stdlib_source_files", "stdlib_text", "read_text_file", "DEFAULT_MAX_CHARS"]
