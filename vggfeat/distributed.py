"""The little of torch.distributed that vggfeat needs, usable with or without ``torchrun``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from .devices import resolve_device


# Long enough for the slowest legitimate wait (rank 0 writing a checkpoint of VGG-19 with its
# optimiser state, a merge of extraction shards); a hang fails well before NCCL's watchdog
# would notice it, and states which collective it was.
DEFAULT_TIMEOUT = timedelta(minutes=30)


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of the process with ``local_rank`` under torchrun: its own GPU, whatever
    index ``device`` names (``cuda:0`` on every rank would put them all on one GPU)."""
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


@dataclass
class Distributed:
    """This process's place in a run: rank, world size and device.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is joined with NCCL on GPUs and gloo
    on CPUs; each rank takes GPU ``LOCAL_RANK`` (``cuda`` and ``cuda:N`` alike: choose the GPUs
    with ``CUDA_VISIBLE_DEVICES``).  A collective that waits longer than ``timeout`` fails the run
    with an error instead of hanging.  Alone, every collective is a no-op.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls, device: str | torch.device = "cpu", *,
                 timeout: timedelta = DEFAULT_TIMEOUT) -> Distributed:
        device = resolve_device(device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(0, 1, device)
        device = rank_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                          device_id=device if device.type == "cuda" else None,
                                          timeout=timeout)
        return cls(torch_dist.get_rank(), torch_dist.get_world_size(), device)

    @classmethod
    def alone(cls, device: str | torch.device = "cpu") -> Distributed:
        """This process on its own, joining no process group, even under ``torchrun`` (where
        it takes its rank's GPU): for work that processes share without collectives."""
        device = resolve_device(device)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = rank_device(device, int(os.environ.get("LOCAL_RANK", "0")))
            if device.type == "cuda":
                torch.cuda.set_device(device)
        return cls(0, 1, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        return bool(self.broadcast_int(int(flag)))

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` (anything picklable) on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank."""
        if self.world_size == 1:
            return value
        box = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch_dist.broadcast(box, src=0)
        return int(box.item())

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch_dist.all_reduce(tensor)
        return tensor
