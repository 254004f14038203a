"""The progress bar of the training and sampling commands (tqdm), shown by the main process only."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int, *, initial: int = 0, desc: str = "", unit: str = "step", enabled: bool = True):
    """A tqdm bar over ``total`` steps starting at ``initial`` (a resumed run starts where it stopped).

    Use ``bar.set_postfix(loss=..., tok_s=...)`` for the live figures and ``bar.update(1)`` per step.
    ``enabled=False`` (other ranks, or --quiet) gives a bar that prints nothing.
    """
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                file=sys.stderr, smoothing=0.1)
