"""Training and validation images, and the seeded order in which a run visits them.

``ROOT/train`` and ``ROOT/val`` are ImageNet's folders (WordNet-id class folders, in the class
order torchvision and timm use; a flat val folder with the devkit or a CSV) or, for other data,
any folder-per-class dataset whose val classes are a subset of the train classes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from ..data.folders import labelled_folder
from ..data.images import read_image
from ..data.loader import single_threaded_worker
from ..data.sources import ImageList, InputError
from .augment import augment, derived_seed


def training_data(root: str | os.PathLike, *, devkit: str | None = None,
                  labels_csv: str | None = None) -> tuple[ImageList, ImageList]:
    """(train, val) image lists of ``ROOT/train`` and ``ROOT/val``, labelled in one class order."""
    root = Path(root).expanduser()
    for folder in (root / "train", root / "val"):
        if not folder.is_dir():
            raise InputError(f"{folder} does not exist: --data must hold train/ and val/ "
                             "(ImageNet's layout, or one sub-folder per class in each)")
    train = labelled_folder(root / "train")
    val = labelled_folder(root / "val", class_names=train.class_names, devkit=devkit,
                          labels_csv=labels_csv)
    return train, val


def epoch_order(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the n training images visited in ``epoch``."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class Batch:
    images: Tensor  # uint8 N×3×crop×crop
    labels: Tensor  # int64 N
    alphas: Tensor  # float32 N×3, colour-shift coefficients
    failed: list[tuple[int, str]]  # (image index, reason) of images skipped in this batch

    def pin_memory(self) -> Batch:
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.alphas.pin_memory(),
                     self.failed)


class TrainImages(Dataset):
    """Key (epoch, index) → (index, augmented uint8 view or None, α, failure reason or None)."""

    def __init__(self, paths: list[str], transform: v2.Compose, *, seed: int,
                 lighting: float) -> None:
        self.paths, self.transform, self.seed, self.lighting = paths, transform, seed, lighting

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        try:
            image = read_image(self.paths[index])
            view, alphas = augment(image, self.transform, lighting=self.lighting,
                                   seed=derived_seed(self.seed, epoch, index))
            return index, view, alphas, None
        except Exception as err:  # one bad file must not end a run on day 3: skip and count
            return index, None, None, str(err) or type(err).__name__


class _Collate:
    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def __call__(self, items) -> Batch:
        good = [(i, v, a) for i, v, a, _ in items if v is not None]
        failed = [(i, r) for i, v, _, r in items if v is None]
        if not good:
            return Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long),
                         torch.empty(0, 3), failed)
        return Batch(torch.stack([v for _, v, _ in good]),
                     torch.as_tensor(self.labels[[i for i, _, _ in good]], dtype=torch.long),
                     torch.stack([a for _, _, a in good]), failed)


def micro_batches(order: np.ndarray, *, epoch: int, first_step: int, batch_size: int, rank: int,
                  world_size: int, micro_batch: int) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches, step by step from ``first_step`` to the end of the epoch.

    Step s uses images ``order[s·B:(s+1)·B]``; rank r takes the r-th contiguous share and splits
    it into micro-batches.  The last incomplete global batch of an epoch is dropped.
    """
    share = batch_size // world_size
    out = []
    for step in range(first_step, len(order) // batch_size):
        mine = order[step * batch_size + rank * share: step * batch_size + (rank + 1) * share]
        out += [[(epoch, int(i)) for i in mine[k:k + micro_batch]]
                for k in range(0, share, micro_batch)]
    return out


def train_loader(dataset: TrainImages, labels: np.ndarray, batches: list[list[tuple[int, int]]],
                 *, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batches, collate_fn=_Collate(np.asarray(labels)),
                      num_workers=workers, worker_init_fn=single_threaded_worker, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=False)
