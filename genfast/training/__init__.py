"""genfast's one training loop and its pieces: the run folder and atomic checkpoints with exact resume, Ctrl-C and
SIGTERM, torch.distributed (DDP via torchrun), progress bars, learning-rate schedules and PNG image grids.

Every `genfast train <model>` recipe (genfast/recipes/<model>.py) is a :class:`TrainTask` run by
:func:`start_run` / :meth:`Run.train` (genfast/training/loop.py documents the API with an example), with the
common flags of :func:`add_train_args`.
"""

from genfast.training.checkpoint import (
    CHECKPOINT_DIR,
    FORMAT_VERSION,
    find_checkpoint,
    load_checkpoint,
    load_safetensors_state,
    read_checkpoint_config,
    save_checkpoint,
)
from genfast.training.distributed import Distributed
from genfast.training.images import save_image_grid
from genfast.training.interrupt import StopOnInterrupt
from genfast.training.loop import INTERRUPTED_EXIT, SAMPLES_DIR, Run, TrainTask, start_run
from genfast.training.options import (
    CommandParser,
    add_device_args,
    add_train_args,
    mark_fixed,
    non_negative_float,
    non_negative_int,
    open_probability,
    positive_float,
    positive_int,
    probability,
    resolve_device,
    unit_interval,
)
from genfast.training.progress import progress_bar
from genfast.training.rng import batch_generator, capture_rng_state, restore_rng_state, seed_everything
from genfast.training.schedule import default_warmup, warmup_cosine_lr

__all__ = ["CommandParser", "mark_fixed", "TrainTask", "Run", "start_run", "add_train_args", "add_device_args",
           "resolve_device",
           "positive_int", "non_negative_int", "positive_float", "non_negative_float", "probability",
           "open_probability", "unit_interval", "INTERRUPTED_EXIT", "SAMPLES_DIR", "CHECKPOINT_DIR", "FORMAT_VERSION",
           "save_checkpoint", "load_checkpoint", "find_checkpoint", "read_checkpoint_config",
           "load_safetensors_state", "Distributed", "save_image_grid", "StopOnInterrupt", "progress_bar",
           "seed_everything", "capture_rng_state", "restore_rng_state", "batch_generator", "warmup_cosine_lr",
           "default_warmup"]
