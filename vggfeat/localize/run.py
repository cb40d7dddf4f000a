"""``vggfeat localize evaluate``: localisation error over a folder of images with known boxes."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import draw_bounding_boxes
from tqdm.auto import tqdm

from ..data.boxes import BoxTable, ImageBoxes, write_loc_csv
from ..data.images import read_image, to_pil
from ..data.loader import image_loader
from ..data.sources import gather_images
from ..errors import InputError
from ..extract.run import default_workers
from ..fileio import atomic_path, write_json_atomic
from .metric import gt_class_errors, score_guesses
from .predict import Guess, Localizer


@dataclass
class LocImages:
    """Images with ground-truth boxes; ``without_boxes`` counts the images left out."""

    paths: list[str]
    truths: list[ImageBoxes]
    without_boxes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def images_with_boxes(folder: str | os.PathLike, boxes: BoxTable) -> LocImages:
    """The images of ``folder`` (flat, or in class folders) that ``boxes`` describes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} does not exist: --data must hold val/ (flat, or one "
                         "sub-folder per class), as for `vggfeat train`")
    found = gather_images([folder])
    paths, truths, missing = [], [], []
    for path in found.paths:
        truth = boxes.get(path)
        if truth is None or not len(truth.wnids):
            missing.append(path)
        else:
            paths.append(path)
            truths.append(truth)
    if not paths:
        raise InputError(f"none of the {len(found)} images in {folder} has a box in "
                         f"{boxes.source}; images are matched by file name without extension")
    return LocImages(paths, truths, missing)


@dataclass
class LocResult:
    method: str
    scales: tuple[int, ...]
    paths: list[str]
    guesses: list[list[Guess]]  # per image, best first (center-crop: the ground-truth class's)
    metrics: dict
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict:
        return {**{k: round(v, 3) for k, v in self.metrics.items()}, "images": len(self.paths),
                "failed": len(self.failed), "method": self.method, "scales": list(self.scales),
                "seconds": round(self.seconds, 1)}


def evaluate_localization(localizer: Localizer, images: LocImages, *, batch_size: int = 8,
                          workers: int | None = None, progress: bool = True) -> LocResult:
    """Run ``localizer`` on every image and score it (the metric of :mod:`.metric`).

    ``workers``: image-decoding processes (default: half the cores, at most 8).
    """
    start = time.monotonic()
    workers = default_workers() if workers is None else workers
    names = localizer.class_names
    index = {name: k for k, name in enumerate(names)}
    loader = image_loader(images.paths, np.arange(len(images)), localizer.prepare,
                          batch_size=batch_size, workers=workers,
                          pin_memory=localizer.locs[0].device.type == "cuda")
    if localizer.method == "center-crop":
        unknown = [(p, t.wnids[0]) for p, t in zip(images.paths, images.truths)
                   if t.wnids[0] not in index]
        if unknown:
            raise InputError(f"{unknown[0][0]}: its class {unknown[0][1]} is not among the "
                             f"{len(names)} classes of the localisation net ({len(unknown)} "
                             "such images)")
    kept, guesses, failed = [], [], []
    with tqdm(total=len(images), unit="img", disable=not progress,
              desc=f"localize {localizer.method}") as bar:
        for batch in loader:
            good = [(i, localizer.unpack(item)) for i, item, _ in batch if item is not None]
            failed += [(images.paths[i], r) for i, _, r in batch if r is not None]
            bar.update(len(batch) - len(good))
            if localizer.method == "dense":
                for i, (views, size) in good:
                    guesses.append(localizer.dense(views, size))
                    bar.update()  # one image at a time: the bar moves per image
            elif good:
                classes = [index[images.truths[i].wnids[0]] for i, _ in good]
                boxes = localizer.center_crop([item[0] for _, item in good],
                                              [item[1] for _, item in good],
                                              torch.tensor(classes))
                guesses += [[Guess(c, names[c], tuple(b.tolist()), 1.0)]
                            for c, b in zip(classes, boxes)]
                bar.update(len(good))
            kept += [i for i, _ in good]
    truths = [images.truths[i] for i in kept]
    if not kept:
        raise InputError("no image could be read; see the reasons above")
    if localizer.method == "dense":
        table = BoxTable({str(i): t for i, t in enumerate(truths)})
        score = score_guesses({str(i): [(g.wnid, g.box) for g in gs]
                               for i, gs in enumerate(guesses)}, table)
        metrics = {"top1_loc_error": score.top1_loc_error, "top5_loc_error": score.top5_loc_error}
    else:
        boxes = np.array([gs[0].box for gs in guesses])
        wrong = gt_class_errors(boxes, [t.of_class(gs[0].wnid) for t, gs in zip(truths, guesses)])
        metrics = {"gt_class_loc_error": 100.0 * float(wrong.mean())}
    return LocResult(localizer.method, localizer.scales, [images.paths[i] for i in kept], guesses,
                     metrics, failed, time.monotonic() - start)


def write_predictions(result: LocResult, path: str | os.PathLike) -> Path:
    """The LOC submission CSV: per image, up to 5 ``wnid xmin ymin xmax ymax`` groups."""
    return write_loc_csv(path, {Path(p).stem: [(g.wnid, g.box) for g in gs]
                                for p, gs in zip(result.paths, result.guesses)})


def write_summary(result: LocResult, path: str | os.PathLike, **extra) -> Path:
    write_json_atomic(path, {**result.summary(), **extra})
    return Path(path)


def draw_guesses(image_path: str | os.PathLike, guesses: list[Guess],
                 truth: ImageBoxes | None, output: str | os.PathLike) -> Path:
    """A PNG of the image with the true boxes (green), the best guess (red, thick) and the other
    guesses (orange), labelled by class and rank."""
    image = read_image(image_path)
    width = max(2, min(image.shape[-2:]) // 150)
    if truth is not None and len(truth.wnids):
        image = draw_bounding_boxes(image, torch.as_tensor(truth.xyxy), colors="lime",
                                    width=width, labels=[f"true {w}" for w in truth.wnids])
    if guesses[1:]:
        image = draw_bounding_boxes(image, torch.tensor([g.box for g in guesses[1:]]),
                                    colors="orange", width=max(1, width // 2),
                                    labels=[f"{k + 2}: {g.wnid}"
                                            for k, g in enumerate(guesses[1:])])
    if guesses:
        image = draw_bounding_boxes(image, torch.tensor([guesses[0].box]), colors="red",
                                    width=width, labels=[f"1: {guesses[0].wnid}"])
    output = Path(output)
    with atomic_path(output) as tmp:
        to_pil(image).save(tmp, format="PNG")
    return output


def draw_all(result: LocResult, images: LocImages, folder: str | os.PathLike) -> int:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    truth = dict(zip(images.paths, images.truths))
    for path, guesses in zip(result.paths, result.guesses):
        draw_guesses(path, guesses, truth.get(path), folder / f"{Path(path).stem}.png")
    return len(result.paths)
