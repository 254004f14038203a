"""What every model config dataclass shares: checked construction from a dict, to_dict, presets, and the
argument checks ("an int >= 1 that is not a bool") written once.

    @dataclass
    class MyConfig(ModelConfig):
        width: int = 32
        beta: float = 1.0

        def __post_init__(self):
            check_ints(self, ("width",), minimum=1)
            check_number(self, "beta", minimum=0.0)

``MyConfig.from_dict(d)`` names unknown keys and turns a mistyped value into a ValueError naming the field;
``PRESETS = {"tiny": {...}}`` on the class enables ``MyConfig.preset("tiny", width=8)``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar


def check_int(config: Any, name: str, value: Any = dataclasses.MISSING, *, minimum: int = 1,
              maximum: int | None = None) -> None:
    """ValueError unless ``value`` (default: the config's field ``name``) is an int (not a bool) in range."""
    value = getattr(config, name) if value is dataclasses.MISSING else value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{type(config).__name__}.{name} must be an int {bound}, got {value!r}")


def check_ints(config: Any, names: tuple[str, ...], *, minimum: int = 1) -> None:
    for name in names:
        check_int(config, name, minimum=minimum)


def check_number(config: Any, name: str, *, minimum: float | None = None, below: float | None = None) -> None:
    """ValueError unless the field is a finite int/float (not a bool), >= minimum and < below where given."""
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
        minimum is None or value >= minimum) and (below is None or value < below)
    if not ok:
        parts = [f">= {minimum}" if minimum is not None else "", f"< {below}" if below is not None else ""]
        bound = " and ".join(p for p in parts if p)
        raise ValueError(f"{type(config).__name__}.{name} must be a finite number{' ' + bound if bound else ''}, "
                         f"got {value!r}")


def check_choice(config: Any, name: str, choices: tuple) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{type(config).__name__}.{name} must be one of {', '.join(map(str, choices))}, "
                         f"got {value!r}")


class ModelConfig:
    """Mixin for dataclass configs: from_dict / to_dict / preset."""

    PRESETS: ClassVar[dict[str, dict] | None] = None

    @classmethod
    def from_dict(cls, values: Any):
        """A config from a dict (e.g. a checkpoint's config.json "model"): ValueError naming an unknown key or a
        value of the wrong type."""
        if not isinstance(values, dict):
            raise ValueError(f"{cls.__name__}.from_dict: need a dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown options {unknown} (known: {', '.join(sorted(known))})")
        try:
            return cls(**values)
        except TypeError as exc:  # e.g. a list where the field compares with an int
            raise ValueError(f"{cls.__name__}: {exc}") from exc

    @classmethod
    def preset(cls, name: str, **overrides):
        presets = cls.PRESETS or {}
        if name not in presets:
            raise ValueError(f"{cls.__name__}.preset: unknown preset {name!r}; known: {', '.join(presets)}")
        return cls.from_dict({**presets[name], **overrides})

    def to_dict(self) -> dict:
        """The fields as JSON types (tuples become lists), what from_dict takes back."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


__all__ = ["ModelConfig", "check_int", "check_ints", "check_number", "check_choice"]
