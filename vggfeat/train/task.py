"""What a training run learns: the parts of the loop that depend on the targets.

:func:`vggfeat.train.train` owns everything else (data order, seeded augmentation, gradient
accumulation, DDP, autocast, checkpoints and exact resume, logs, exports).  A :class:`Task` says
what a training image's target is, the loss, the net to start from and how to validate.
:class:`ImageClassification` (the paper's ImageNet training) is the default; other tasks
subclass :class:`Task` and are passed as ``train(recipe, task, out)``.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2

from ..data.sources import ImageList
from ..evaluate.methods import topk_misses
from ..evaluate.run import evaluate
from ..models.runner import memory_format_of
from ..models.vgg import VGG
from .data import training_data
from .model import build_model
from .recipe import Recipe


class Task:
    """The target-dependent parts of training.

    Attributes:
        train_set, val_set: the images (the loop uses their ``paths``).
        metrics: names of the validation values, lower is better; the first drives the lr
            schedule and picks ``best.safetensors``.  All go to metrics.csv, TensorBoard and
            curves.png.
        recipe_class: what ``--resume`` without a recipe reads the run's recipe.yaml as.
    """

    train_set: ImageList
    val_set: ImageList
    metrics: tuple[str, ...] = ()
    recipe_class: type[Recipe] = Recipe

    def build_model(self, recipe: Recipe, *, download: bool = True) -> VGG:
        """The net training starts from."""
        raise NotImplementedError

    def sample(self, image: Tensor, index: int, transform: v2.Compose) -> tuple[Tensor, Tensor]:
        """Training image ``index`` (decoded uint8 3×H×W) → (uint8 3×crop×crop view, target).

        Runs in the loader workers, under a random state seeded from (seed, epoch, index), so
        the same view comes back on resume.  Targets are ``torch.stack``-ed into a batch.
        """
        raise NotImplementedError

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean loss of a micro-batch: float32 N×K crop-mode outputs, stacked targets (device)."""
        raise NotImplementedError

    def validate(self, model: VGG, images: ImageList, recipe: Recipe, *, device: torch.device,
                 workers: int, amp: str | None) -> dict[str, float]:
        """Sums over ``images`` (this process's share) of each metric's per-image value, and
        ``images``, the number scored.  The loop adds the shares of all processes and divides.

        ``model`` is in eval mode on ``device``; use it as it is.
        """
        raise NotImplementedError

    def weights_meta(self) -> dict:
        """Extra metadata for the exported weight files."""
        return {}


class ImageClassification(Task):
    """Softmax classification over the class folders of ``train_set`` (Sect. 3.1)."""

    metrics = ("val_top1_error", "val_top5_error")

    def __init__(self, train_set: ImageList, val_set: ImageList) -> None:
        self.train_set, self.val_set = train_set, val_set
        self.class_names = train_set.class_names
        self._labels = np.asarray(train_set.labels, dtype=np.int64)

    @classmethod
    def from_folders(cls, root: str | os.PathLike, *, devkit: str | None = None,
                     labels_csv: str | None = None) -> ImageClassification:
        """``ROOT/train`` and ``ROOT/val`` (see :func:`training_data`)."""
        return cls(*training_data(root, devkit=devkit, labels_csv=labels_csv))

    def build_model(self, recipe: Recipe, *, download: bool = True) -> VGG:
        return build_model(recipe, len(self.class_names), download=download)

    def sample(self, image: Tensor, index: int, transform: v2.Compose) -> tuple[Tensor, Tensor]:
        return transform(image), torch.as_tensor(self._labels[index])

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets)

    def validate(self, model: VGG, images: ImageList, recipe: Recipe, *, device: torch.device,
                 workers: int, amp: str | None) -> dict[str, float]:
        sums = {"images": 0, "val_top1_error": 0.0, "val_top5_error": 0.0}
        if not len(images):
            return sums
        lo, hi = recipe.scale_range
        q = recipe.val_scale or (lo if lo == hi else 384)
        result = evaluate(images, model, method=recipe.val_method, scales=(q,),
                          batch_size=max(1, (recipe.micro_batch or recipe.batch_size) // 2),
                          workers=workers, device=str(device), amp=amp, progress=False,
                          channels_last=memory_format_of(model) == torch.channels_last)
        if len(result.labels):
            sums = {"images": len(result.labels),
                    "val_top1_error": 100.0 * topk_misses(result.posteriors, result.labels, 1),
                    "val_top5_error": 100.0 * topk_misses(result.posteriors, result.labels, 5)}
        return sums

    def weights_meta(self) -> dict:
        return {"class_names": self.class_names}
