"""The lent GPU machine's Python packages, and a way to run a module here as if only those were installed.

The lent image (torch 2.11 cu130, triton 3.6, Python 3.12) has no package index, so a module of the plan that
imports anything else fails there, after the lease has started. ``make gpu-check-dry`` runs every step of the plan
under ``python -m benchmarks.gpu_check.lent_image MODULE ARGS...``, which hides every installed distribution that is
neither one of ``LENT_IMAGE`` nor needed by one of them (their ``Requires-Dist``, followed through): a hidden
package's modules are not found (``import diffusers`` raises ModuleNotFoundError and ``importlib.util.find_spec``
returns None, as on the lent machine), and its entry points are gone too (pytest does not autoload a hidden plugin).
"""

from __future__ import annotations

import re
import runpy
import sys
from importlib import metadata

# What the lent image holds that the plan may use (issue 25; the image has more, but only these are promised).
LENT_IMAGE = ("torch", "triton", "numpy", "pytest", "pytest-xdist", "hypothesis", "matplotlib", "transformers",
              "safetensors", "tokenizers", "scikit-learn", "pillow", "tqdm", "ninja", "pybind11")
# This project itself (an editable install here; the working tree there).
OWN = ("genfast",)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist: metadata.Distribution) -> list[str]:
    """The distributions ``dist`` needs in this environment (no extras, markers evaluated here)."""
    from packaging.requirements import InvalidRequirement, Requirement

    names = []
    for text in dist.requires or []:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(_norm(req.name))
    return names


def allowed_distributions() -> set[str]:
    """LENT_IMAGE and OWN with everything they require, as normalized distribution names."""
    installed = {_norm(d.metadata["Name"]): d for d in metadata.distributions() if d.metadata["Name"]}
    allowed: set[str] = set()
    todo = [_norm(n) for n in LENT_IMAGE + OWN]
    while todo:
        name = todo.pop()
        if name in allowed:
            continue
        allowed.add(name)
        if name in installed:
            todo.extend(_requirements(installed[name]))
    return allowed


def hidden() -> tuple[set[str], set[str]]:
    """(distribution names, top-level module names) installed here but absent from the lent image."""
    allowed = allowed_distributions()
    dists = {_norm(d.metadata["Name"]) for d in metadata.distributions() if d.metadata["Name"]} - allowed
    modules = {module for module, owners in metadata.packages_distributions().items()
               if all(_norm(owner) in dists for owner in owners)}
    return dists, modules


class _Without:
    """A meta-path finder as it would be without the hidden packages: it finds neither their modules nor their
    distribution metadata (so neither their entry points)."""

    def __init__(self, finder, dists: set[str], modules: set[str]):
        self._finder, self._dists, self._modules = finder, dists, modules

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self._modules or not hasattr(self._finder, "find_spec"):
            return None
        return self._finder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        if not hasattr(self._finder, "find_distributions"):
            return iter(())
        return (d for d in self._finder.find_distributions(*args, **kwargs)
                if _norm(d.metadata["Name"] or "") not in self._dists)

    def __getattr__(self, attr):  # invalidate_caches and the like
        return getattr(self._finder, attr)


def install() -> set[str]:
    """Hide the packages the lent image lacks from this process (the earlier, the better: a module imported
    already stays). Returns the hidden top-level module names."""
    dists, modules = hidden()
    loaded = sorted(m for m in modules if m in sys.modules)
    if loaded:
        raise RuntimeError(f"lent_image.install: already imported, cannot be hidden: {', '.join(loaded)}")
    sys.meta_path[:] = [f if isinstance(f, _Without) else _Without(f, dists, modules) for f in sys.meta_path]
    return modules


def main(argv: list[str]) -> None:
    """``python -m benchmarks.gpu_check.lent_image MODULE ARGS...``: run MODULE as ``python -m`` would, with the
    packages the lent image lacks hidden."""
    if not argv:
        raise SystemExit("usage: python -m benchmarks.gpu_check.lent_image MODULE [ARGS...]")
    install()
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
