"""Training box-regression nets (Appendix A) with vggfeat's training loop.

:func:`vggfeat.train.train` runs the loop (seeded augmentation, gradient accumulation, DDP,
autocast, checkpoints with exact resume, logs, exports); :class:`Localization` supplies the
parts that differ from classification: the box target of each training view, the Euclidean loss,
the net (a classification net with a new fc8, conv layers frozen for ``finetune: fc``) and the
validation metric, the centre-crop localisation error with the ground-truth class (Table 8).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

from ..data.boxes import BoxTable, inside_image, read_boxes
from ..data.folders import labelled_folder
from ..data.sources import ImageList
from ..errors import InputError, RecipeError
from ..models.configs import INPUT_SIZE
from ..models.finetune import freeze
from ..models.runner import memory_format_of
from ..models.vgg import VGG
from ..train.model import build_model
from ..train.recipe import Recipe
from ..train.task import Task
from .geometry import BoxAugment
from .net import HEADS, BoxHead, box_head, euclidean_loss, new_box_layer
from .predict import Localizer
from .run import LocImages, evaluate_localization, images_with_boxes

FINETUNE = {"fc": "conv", "all": "none"}  # what to freeze: fc6–fc8 train, or every layer


@dataclass(frozen=True)
class LocRecipe(Recipe):
    """A :class:`vggfeat.train.Recipe` for a localisation net.

    Attributes:
        head: ``scr`` (one box, 4 outputs) or ``pcr`` (a box per class, 4·C outputs).
        finetune: ``fc`` trains fc6, fc7 and the new fc8 (OverFeat's choice); ``all`` trains
            every layer.
        weights: the classification net to start from (every layer but fc8).
        lr: 10⁻³ (Appendix A), for a batch of 256.
        test_scales: the scales Q at which ``vggfeat localize evaluate --method dense`` runs
            this net by default (recorded in its weights with the recipe); None: Q = S.
    """

    head: str = "pcr"
    finetune: str = "all"
    lr: float | None = 1e-3
    test_scales: tuple[int, ...] | None = None
    resume_fixed: ClassVar[tuple[str, ...]] = Recipe.resume_fixed + ("head", "finetune")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head not in HEADS:
            raise RecipeError(f"head must be scr or pcr, got {self.head!r}")
        if self.finetune not in FINETUNE:
            raise RecipeError(f"finetune must be fc or all, got {self.finetune!r}")
        if self.test_scales is not None:
            scales = self.test_scales if isinstance(self.test_scales, (list, tuple)) else [
                self.test_scales]
            if not scales or not all(isinstance(q, int) and not isinstance(q, bool) and
                                     q >= INPUT_SIZE for q in scales):
                raise RecipeError(f"test_scales must be a list of scales Q ≥ {INPUT_SIZE} px, "
                                  f"got {self.test_scales!r}")
            object.__setattr__(self, "test_scales", tuple(scales))


class Localization(Task):
    """Box regression on ``ROOT/train`` images with boxes, validated on ``ROOT/val`` images with
    boxes; boxes are matched to images by file name."""

    metrics = ("val_loc_error",)
    recipe_class = LocRecipe

    def __init__(self, train_set: ImageList, train_boxes: list[np.ndarray], val: LocImages, *,
                 head: str, without_boxes: int = 0) -> None:
        self.train_set, self.val = train_set, val
        self.val_set = ImageList(val.paths)
        self.train_boxes = train_boxes
        self.head: BoxHead = box_head(head, train_set.class_names)
        self._labels = np.asarray(train_set.labels, dtype=np.int64)
        self._truth = dict(zip(val.paths, val.truths))
        self.without_boxes = without_boxes  # training images left out: no box of their class

    @classmethod
    def from_folders(cls, root: str | os.PathLike, boxes: BoxTable | list, *,
                     head: str) -> Localization:
        """``ROOT/train`` (class folders) and ``ROOT/val`` (flat or class folders) with the boxes
        of one or more box files or folders (:func:`vggfeat.data.boxes.read_boxes`)."""
        root = Path(root).expanduser()
        for folder in (root / "train", root / "val"):
            if not folder.is_dir():
                raise InputError(f"{folder} does not exist: --data must hold train/ (one "
                                 "sub-folder per class) and val/ (flat or in class folders)")
        table = boxes if isinstance(boxes, BoxTable) else merged_boxes(boxes)
        train = labelled_folder(root / "train")
        paths, labels, kept_boxes = [], [], []
        for path, label in zip(train.paths, train.labels):
            found = table.get(path)
            if found is None:
                continue
            wnid = train.class_names[label]
            own = found.of_class(wnid) if wnid in found.wnids else found.xyxy
            if len(own):
                paths.append(path)
                labels.append(label)
                kept_boxes.append(own)
        if not paths:
            raise InputError(f"none of the {len(train)} training images in {root / 'train'} has "
                             f"a box: {table.no_match(train.paths)}; give the training boxes "
                             "(LOC_train_solution.csv or the train bbox XML folder) with --boxes")
        # The head covers the classes the training images have boxes for (ILSVRC: all 1000),
        # not every class of the label space (1000 for WordNet-id folders): a class never
        # trained would keep random box outputs.
        present = sorted(set(labels))
        names = [train.class_names[y] for y in present]
        labels = np.searchsorted(present, labels).tolist()
        kept = ImageList(paths, labels, names, train.sources)
        val = images_with_boxes(root / "val", table)
        wanted = set(names)  # val images of other classes cannot be scored with their class
        known = [k for k, truth in enumerate(val.truths) if truth.wnids[0] in wanted]
        val = LocImages([val.paths[k] for k in known], [val.truths[k] for k in known],
                        val.without_boxes)
        return cls(kept, kept_boxes, val, head=head, without_boxes=len(train) - len(paths))

    def build_model(self, recipe: LocRecipe, *, download: bool = True) -> VGG:
        model = new_box_layer(lambda: build_model(recipe, self.head.outputs, download=download),
                              self.head)
        freeze(model, FINETUNE[recipe.finetune])
        return model

    def sample(self, image: Tensor, index: int, transform: v2.Compose) -> tuple[Tensor, Tensor]:
        height, width = image.shape[-2:]
        boxes = inside_image(self.train_boxes[index], width, height,
                             where=self.train_set.paths[index])
        view, box = BoxAugment(transform)((image, boxes))
        return view, torch.cat([torch.tensor([float(self._labels[index])]), box])

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return euclidean_loss(outputs, targets, self.head)

    def validate(self, model: VGG, images: ImageList, recipe: Recipe, *, device: torch.device,
                 workers: int, amp: str | None) -> dict[str, float]:
        if not len(images):
            return {"images": 0, "val_loc_error": 0.0}
        q = recipe.val_scale or recipe.scale_range[0]
        localizer = Localizer(model, method="center-crop", scales=(q,), device=device, amp=amp,
                              batch_size=max(1, (recipe.micro_batch or recipe.batch_size) // 2),
                              channels_last=memory_format_of(model) == torch.channels_last)
        shard = LocImages(images.paths, [self._truth[p] for p in images.paths])
        result = evaluate_localization(localizer, shard, batch_size=localizer.locs[0].batch_size,
                                       workers=workers, progress=False)
        n = len(result.paths)
        return {"images": n, "val_loc_error": result.metrics["gt_class_loc_error"] * n}

    def weights_meta(self) -> dict:
        return self.head.to_meta()


def merged_boxes(paths: list[str | os.PathLike]) -> BoxTable:
    """One table from several box files or folders (e.g. the train and the val boxes)."""
    tables = [read_boxes(p) for p in paths]
    merged = BoxTable({}, source=", ".join(t.source for t in tables))
    for table in tables:
        merged.boxes.update(table.boxes)
        merged.bad += table.bad
    return merged
