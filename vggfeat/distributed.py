"""The little of torch.distributed that vggfeat needs, usable with or without ``torchrun``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Distributed:
    """This process's place in a run: rank, world size and device.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is joined with NCCL on GPUs and gloo
    on CPUs; each rank takes GPU ``LOCAL_RANK``.  Alone, every collective is a no-op.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls, device: str | torch.device = "cpu") -> Distributed:
        device = torch.device(device)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(0, 1, device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                          device_id=device if device.type == "cuda" else None)
        return cls(torch_dist.get_rank(), torch_dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        torch_dist.broadcast(value, src=0)
        return bool(value.item())

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` (anything picklable) on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch_dist.all_reduce(tensor)
        return tensor
