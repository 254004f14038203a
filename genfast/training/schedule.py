"""Learning-rate schedules."""

from __future__ import annotations

import math

WARMUP_FRACTION = 10  # without --warmup, at most a tenth of a run warms up


def default_warmup(preferred: int, steps: int) -> int:
    """The warmup of a run of ``steps`` when --warmup is not given: ``preferred``, but at most a tenth of the run
    (a 60-step GPT run with its 100-step warmup ended at 60% of its learning rate, showing nothing). The loop saves
    the resolved value in config.json's "flags", so a resume with another --steps keeps it."""
    return min(preferred, steps // WARMUP_FRACTION)


def warmup_cosine_lr(step: int, *, base_lr: float, warmup_steps: int, total_steps: int,
                     min_lr: float = 0.0) -> float:
    """Linear warmup from 0 to ``base_lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at
    ``total_steps`` (and ``min_lr`` after). A pure function of the step, so a resumed run needs no state."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"warmup_steps must be >= 0 and total_steps >= 1, got {warmup_steps} and {total_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
