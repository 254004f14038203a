"""torch.distributed for the training recipes: DDP when launched by torchrun, a no-op otherwise.

    dist = Distributed.from_environment()     # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun
    model = dist.wrap(model)                  # DistributedDataParallel when world_size > 1
    ...
    dist.close()

The process group uses NCCL on CUDA and gloo on CPU (which is how the tests run 2 processes on one machine).
Each rank takes its own slice of every global batch (``shard``), so the gradients DDP averages equal those of
one process on the whole batch.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @classmethod
    def from_environment(cls, device: str | torch.device | None = None) -> "Distributed":
        """Join the process group torchrun describes in the environment (or run alone without one).

        device: "cuda" / "cpu" / None (None: CUDA when available). Under torchrun with CUDA each rank takes
        the GPU of its LOCAL_RANK.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
        if device.type == "cuda":
            torch.cuda.set_device(device)
        initialized_here = False
        if world_size > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            initialized_here = True
        return cls(rank, world_size, local_rank, device, initialized_here)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module, **ddp_kwargs) -> nn.Module:
        """The model in DistributedDataParallel when there are several processes, else the model itself."""
        if not self.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, **ddp_kwargs)

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch (dim 0); the global batch must divide evenly."""
        if not self.enabled:
            return batch
        if batch.shape[0] % self.world_size:
            raise ValueError(f"batch: global batch size {batch.shape[0]} is not divisible by the "
                             f"{self.world_size} processes")
        per = batch.shape[0] // self.world_size
        return batch[self.rank * per:(self.rank + 1) * per]

    def mean(self, value: float | torch.Tensor) -> float:
        """The mean of a scalar over all ranks (for logging losses)."""
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.enabled:
            torch_dist.all_reduce(t)
            t = t / self.world_size
        return float(t)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any rank (e.g. a Ctrl-C seen by one process)."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    @staticmethod
    def unwrap(holder: object) -> None:
        """Replace each DistributedDataParallel attribute of ``holder`` (a TrainTask) by the module it wraps.

        Done when training ends, so the wrappers (whose reducers hold the process group and gloo's pending work)
        are freed while the interpreter is whole: one that lives on until interpreter shutdown can abort the
        process there ("terminate called without an active exception", seen once in CI on a loaded machine)."""
        for name, value in list(vars(holder).items()):
            if isinstance(value, nn.parallel.DistributedDataParallel):
                setattr(holder, name, value.module)

    def close(self, *, clean: bool = True) -> None:
        """Leave the process group (if this object joined it).

        clean: every rank reached the end normally, so they meet at a barrier first and none tears down its
        connections while another still sends. After an exception the barrier is skipped (it could wait for a
        rank that never comes)."""
        if self.initialized_here and torch_dist.is_initialized():
            if clean:
                torch_dist.barrier()
            gc.collect()  # DDP wrappers in reference cycles: their reducers let go of the group now, not at exit
            torch_dist.destroy_process_group()
            self.initialized_here = False
