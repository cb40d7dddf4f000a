"""Decoding and rescaling in DataLoader workers, overlapped with the network."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .images import BadImage, read_image


class PreparedImages(Dataset):
    """Item = (input index, ``prepare(decoded image)`` or None, failure reason or None)."""

    def __init__(self, paths: list[str], indices: np.ndarray,
                 prepare: Callable[[Tensor], list[Tensor]]) -> None:
        self.paths, self.indices, self.prepare = paths, indices, prepare

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = int(self.indices[i])
        try:
            return index, self.prepare(read_image(self.paths[index])), None
        except BadImage as err:
            return index, None, str(err)
        except Exception as err:  # a worker must not die on one file: record and go on
            return index, None, f"{type(err).__name__}: {err}"


def single_threaded_worker(_: int) -> None:
    # Workers decode; the main process owns the cores for the network.
    torch.set_num_threads(1)


def image_loader(paths: list[str], indices: np.ndarray, prepare: Callable[[Tensor], list[Tensor]],
                 *, batch_size: int, workers: int, pin_memory: bool,
                 items: type[PreparedImages] = PreparedImages) -> DataLoader:
    """Batches (lists) of ``items`` (:class:`PreparedImages` or a subclass) in input order."""
    return DataLoader(items(paths, indices, prepare), batch_size=batch_size,
                      collate_fn=list, num_workers=workers, worker_init_fn=single_threaded_worker,
                      pin_memory=pin_memory)
