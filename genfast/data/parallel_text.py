"""Parallel text for translation: tab-separated sentence pairs (``source<TAB>target``, one pair a line).

The file format of ``genfast train translator --data FILE``. Files from users are untrusted: every way a file
can be wrong (missing, not UTF-8, a line without a tab or with two, an empty side, no pairs at all) is a
clear error naming the file and the line.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Iterable

Pair = tuple[str, str]


def read_tsv(path: str | os.PathLike) -> list[Pair]:
    """The (source, target) pairs of a TSV file. Blank lines are skipped; surrounding whitespace is stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no parallel-text file at {path} (expected source<TAB>target lines)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text: {exc}") from exc
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        tabs = line.count("\t")
        if tabs != 1:
            raise ValueError(f"{path}:{number}: expected one tab between source and target, found {tabs} "
                             f"in {line[:60]!r}")
        source, target = (side.strip() for side in line.split("\t"))
        if not source or not target:
            side = "source" if not source else "target"
            raise ValueError(f"{path}:{number}: the {side} side is empty")
        pairs.append((source, target))
    if not pairs:
        raise ValueError(f"{path} holds no sentence pairs (expected source<TAB>target lines)")
    return pairs


def write_tsv(pairs: Iterable[Pair], path: str | os.PathLike) -> Path:
    """Write pairs as a TSV file (the parent folder is created); refuses text that would not read back."""
    path = Path(path)
    lines = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(s, str) for s in pair):
            raise TypeError(f"pairs[{i}]: need a (source, target) pair of strings, got {pair!r}")
        for side in pair:
            if "\t" in side or "\n" in side or "\r" in side or not side.strip():
                raise ValueError(f"pairs[{i}]: {side!r} is empty or holds a tab or line break")
        lines.append(f"{pair[0]}\t{pair[1]}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def split_pairs(pairs: list[Pair], valid_fraction: float = 0.05) -> tuple[list[Pair], list[Pair]]:
    """(train, valid): a pair is held out when a hash of its text falls under ``valid_fraction``.

    Hashing the text (CRC-32, fixed everywhere) rather than the line number keeps the split the same when the
    file is reordered or extended, and puts duplicates on the same side (no leak from train into valid).
    Each side gets at least one pair when there are two or more distinct pairs.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    if len(pairs) < 2:
        raise ValueError(f"pairs: need at least 2 pairs to split into train and valid, got {len(pairs)}")
    hashes = [zlib.crc32(f"{s}\t{t}".encode()) for s, t in pairs]
    threshold = int(valid_fraction * 2**32)
    if min(hashes) == max(hashes):
        raise ValueError("pairs: need at least 2 distinct pairs to split into train and valid")
    # Keep both sides non-empty, moving whole groups of duplicates: the smallest hash goes to valid, the
    # largest to train.
    threshold = min(max(threshold, min(hashes) + 1), max(hashes))
    held = [h < threshold for h in hashes]
    train = [p for p, h in zip(pairs, held) if not h]
    valid = [p for p, h in zip(pairs, held) if h]
    return train, valid


__all__ = ["read_tsv", "write_tsv", "split_pairs"]
