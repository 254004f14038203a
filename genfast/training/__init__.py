"""Shared training machinery for genfast's models: atomic checkpoints with exact resume, Ctrl-C handling,
torch.distributed (DDP via torchrun), progress bars, learning-rate schedules and PNG image grids.

Each model's command-line recipe (genfast/recipes/<model>.py) is built from these pieces.
"""

from genfast.training.checkpoint import (
    find_checkpoint,
    load_checkpoint,
    load_safetensors_state,
    save_checkpoint,
)
from genfast.training.distributed import Distributed
from genfast.training.images import save_image_grid
from genfast.training.interrupt import StopOnInterrupt
from genfast.training.progress import progress_bar
from genfast.training.rng import batch_generator, capture_rng_state, restore_rng_state, seed_everything
from genfast.training.schedule import warmup_cosine_lr

__all__ = ["save_checkpoint", "load_checkpoint", "find_checkpoint", "load_safetensors_state", "Distributed",
           "save_image_grid", "StopOnInterrupt", "progress_bar", "seed_everything", "capture_rng_state",
           "restore_rng_state", "batch_generator", "warmup_cosine_lr"]
