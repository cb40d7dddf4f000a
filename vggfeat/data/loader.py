"""Decoding and rescaling in DataLoader workers, overlapped with the network."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .images import BadImage, read_image, transforms


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


class PreparedBatch(list):
    """A loader batch: the list of :class:`PreparedImages` items, pinned as whole stacks.

    Pinning each view alone would leave the runner's ``torch.stack`` an unpinned copy to send,
    and a copy from pageable memory blocks the host.  Here the loader's pin thread writes the
    same-shape views of each scale into one pinned block; :func:`stack_rows` then hands the
    block itself to the device copy.
    """

    def pin_memory(self) -> PreparedBatch:
        groups: dict[tuple, list[int]] = defaultdict(list)  # (scale, shape) → item positions
        for pos, (_, views, _) in enumerate(self):
            for s, view in enumerate(views or ()):
                groups[s, view.shape, view.dtype].append(pos)
        pinned = [None if views is None else list(views) for _, views, _ in self]
        for (s, shape, dtype), members in groups.items():
            block = torch.empty((len(members), *shape), dtype=dtype, pin_memory=True)
            torch.stack([self[pos][1][s] for pos in members], out=block)
            for row, pos in enumerate(members):
                pinned[pos][s] = block[row]
        return PreparedBatch((index, views, reason)
                             for (index, _, reason), views in zip(self, pinned))


def stack_rows(views: list[Tensor]) -> Tensor:
    """``torch.stack(views)``, without copying when the views are consecutive rows of one
    tensor (a pinned :class:`PreparedBatch` block): the result then stays pinned."""
    first = views[0]
    size, storage = first.numel(), first.untyped_storage().data_ptr()
    if first.is_contiguous() and all(
            v.is_contiguous() and v.shape == first.shape
            and v.untyped_storage().data_ptr() == storage
            and v.storage_offset() == first.storage_offset() + k * size
            for k, v in enumerate(views)):
        return first.as_strided((len(views), *first.shape), (size, *first.stride()),
                                first.storage_offset())
    return torch.stack(views)


def single_threaded_worker(_: int) -> None:
    # Workers decode; the main process owns the cores for the network.
    torch.set_num_threads(1)


def image_loader(paths: list[str], indices: np.ndarray, prepare: Callable[[Tensor], list[Tensor]],
                 *, batch_size: int, workers: int, pin_memory: bool,
                 items: type[PreparedImages] = PreparedImages) -> DataLoader:
    """Batches (:class:`PreparedBatch` lists) of ``items`` (:class:`PreparedImages` or a
    subclass) in input order."""
    transforms()  # loaded here, once: forked workers inherit torchvision instead of each loading it
    return DataLoader(items(paths, indices, prepare), batch_size=batch_size,
                      collate_fn=PreparedBatch, num_workers=workers,
                      worker_init_fn=single_threaded_worker,
                      pin_memory=pin_memory)
