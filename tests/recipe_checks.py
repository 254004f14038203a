"""Checks shared by the recipe tests."""

from pathlib import Path
from typing import Callable

import torch


def assert_resume_is_exact(train_main: Callable[[list[str]], int], flags: list[str], tmp_path: Path) -> None:
    """``flags`` (which include --steps 4) trained straight, and stopped after 2 then resumed, end in the same
    weights, bit for bit."""
    from safetensors.torch import load_file

    assert train_main([*flags, "--out", str(tmp_path / "straight")]) == 0
    assert train_main([*flags, "--out", str(tmp_path / "split"), "--stop-after", "2"]) == 0
    assert train_main([*flags, "--out", str(tmp_path / "split"), "--resume"]) == 0
    a, b = (load_file(tmp_path / name / "checkpoint" / "model.safetensors") for name in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
