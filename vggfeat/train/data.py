"""Training and validation images, and the seeded order in which a run visits them.

``ROOT/train`` and ``ROOT/val`` are ImageNet's folders (WordNet-id class folders, in the class
order torchvision and timm use; a flat val folder with the devkit or a CSV) or, for other data,
any folder-per-class dataset whose val classes are a subset of the train classes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
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


# Share of each class held out for validation when --data is class folders without train/ val/.
VAL_FRACTION = 0.2


def training_data(root: str | os.PathLike, *, devkit: str | None = None,
                  labels_csv: str | None = None) -> tuple[ImageList, ImageList]:
    """(train, val) image lists of ``ROOT/train`` and ``ROOT/val``, labelled in one class order.

    A ROOT of class folders alone (no train/ and val/) is split: a fixed, seeded
    :data:`VAL_FRACTION` of each class (at least one image) is held out for validation.
    """
    root = Path(root).expanduser()
    if root.is_dir() and not (root / "train").exists() and not (root / "val").exists():
        return hold_out(labelled_folder(root), VAL_FRACTION)
    for folder in (root / "train", root / "val"):
        if not folder.is_dir():
            raise InputError(f"{folder} does not exist: --data must hold train/ and val/ "
                             "(ImageNet's layout, or one sub-folder per class in each)")
    train = labelled_folder(root / "train")
    val = labelled_folder(root / "val", class_names=train.class_names, devkit=devkit,
                          labels_csv=labels_csv)
    return train, val


def hold_out(images: ImageList, fraction: float, *, seed: int = 0) -> tuple[ImageList, ImageList]:
    """Split a labelled list into (train, val), ``fraction`` of each class to val (≥ 1 image)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(images.labels)
    val = []
    for c, name in enumerate(images.class_names):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            raise InputError(f"class {name!r} has {len(members)} image(s): a class-folder dataset "
                             "needs at least 2 per class (one is held out for validation)")
        val += rng.permutation(members)[:max(1, round(fraction * len(members)))].tolist()
    is_val = np.zeros(len(labels), bool)
    is_val[val] = True

    def part(mask: np.ndarray) -> ImageList:
        return ImageList([p for p, m in zip(images.paths, mask) if m], labels[mask].tolist(),
                         list(images.class_names))

    return part(~is_val), part(is_val)


def epoch_order(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The permutation of the n training images visited in ``epoch``."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclass
class Batch:
    images: Tensor  # uint8 N×3×crop×crop
    targets: Tensor  # the task's targets, stacked: N×…
    alphas: Tensor  # float32 N×3, colour-shift coefficients
    failed: list[tuple[int, str]]  # (image index, reason) of images skipped in this batch

    def __len__(self) -> int:
        return len(self.images)

    def pin_memory(self) -> Batch:
        return Batch(self.images.pin_memory(), self.targets.pin_memory(),
                     self.alphas.pin_memory(), self.failed)


class TrainImages(Dataset):
    """Key (epoch, index) → (index, (uint8 view, α, target) or None, failure reason or None).

    ``sample(image, index, transform)`` is the task's (:meth:`Task.sample`).
    """

    def __init__(self, paths: list[str], transform: v2.Compose,
                 sample: Callable[[Tensor, int, v2.Compose], tuple[Tensor, Tensor]], *,
                 seed: int, lighting: float) -> None:
        self.paths, self.transform, self.sample = paths, transform, sample
        self.seed, self.lighting = seed, lighting

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        try:
            image = read_image(self.paths[index])
            view, alphas, target = augment(image, self.transform, lighting=self.lighting,
                                           seed=derived_seed(self.seed, epoch, index),
                                           sample=lambda im, tf: self.sample(im, index, tf))
            return index, (view, alphas, target), None
        except Exception as err:  # one bad file must not end a run on day 3: skip and count
            return index, None, str(err) or type(err).__name__


def _collate(items) -> Batch | list[tuple[int, str]]:
    """Stack the readable samples (in the worker); an all-unreadable micro-batch gives only its
    failures, and the loop still runs it, empty, through every collective."""
    good = [sample for _, sample, _ in items if sample is not None]
    failed = [(i, r) for i, sample, r in items if sample is None]
    if not good:
        return failed
    views, alphas, targets = (torch.stack(parts) for parts in zip(*good))
    return Batch(views, targets, alphas, failed)


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


def train_loader(dataset: TrainImages, batches: list[list[tuple[int, int]]],
                 *, workers: int, pin_memory: bool) -> DataLoader:
    return DataLoader(dataset, batch_sampler=batches, collate_fn=_collate,
                      num_workers=workers, worker_init_fn=single_threaded_worker, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, persistent_workers=False)
