"""The ILSVRC localisation metric.

An image counts as localised by a set of (class, box) guesses when one of them has a class of the
image and overlaps a ground-truth box of that class with IoU above 0.5 (strictly: the paper's
rule, Appendix A).  The top-5 error uses the first 5 guesses, the top-1 error the first one.
The centre-crop protocol (Table 8) scores one box per image, made for the ground-truth class: it
is wrong when its IoU with every ground-truth box of that class is 0.5 or less.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..data.boxes import BoxTable, ImageBoxes
from ..errors import InputError
from .geometry import iou

IOU_THRESHOLD = 0.5
TOP_K = 5  # guesses an image is scored on (the ILSVRC top-5 error)


def hit(wnid: str, box, truth: ImageBoxes, *, threshold: float = IOU_THRESHOLD) -> bool:
    """Whether one guess is right: its class is among the image's and it overlaps one of that
    class's boxes with IoU > ``threshold``."""
    same = truth.of_class(wnid)
    return bool(len(same)) and bool((iou(np.asarray(box)[None], same) > threshold).any())


def localized(guesses: list[tuple[str, object]], truth: ImageBoxes, k: int, *,
              threshold: float = IOU_THRESHOLD) -> bool:
    """Whether any of the first ``k`` (wnid, box) guesses is right."""
    return any(hit(w, b, truth, threshold=threshold) for w, b in guesses[:k])


@dataclass
class LocScore:
    top1_loc_error: float  # %
    top5_loc_error: float
    images: int
    missing: int  # ground-truth images without a prediction (counted as errors)

    def summary(self) -> dict:
        return {"top1_loc_error": round(self.top1_loc_error, 3),
                "top5_loc_error": round(self.top5_loc_error, 3), "images": self.images,
                "missing_predictions": self.missing}


def score_guesses(predictions: dict[str, list[tuple[str, object]]], truth: BoxTable, *,
                  threshold: float = IOU_THRESHOLD) -> LocScore:
    """Top-1 and top-5 localisation error (%) of ranked guesses over every ground-truth image.

    ``predictions`` maps image names to (wnid, box) guesses, best first.  Ground-truth images
    without predictions count as errors, as the ILSVRC evaluation does.
    """
    if not truth.boxes:
        raise InputError(f"no ground-truth boxes in {truth.source or 'the box table'}")
    wrong1 = wrong5 = missing = 0
    for name, boxes in truth.boxes.items():
        guesses = predictions.get(name)
        if guesses is None:
            missing += 1
            guesses = []
        # The top-1 guess is the first of the top 5: test it once.
        first = localized(guesses, boxes, 1, threshold=threshold)
        wrong1 += not first
        wrong5 += not (first or localized(guesses[1:], boxes, 4, threshold=threshold))
    n = len(truth.boxes)
    return LocScore(100.0 * wrong1 / n, 100.0 * wrong5 / n, n, missing)


def score_submission(submission: BoxTable, truth: BoxTable) -> LocScore:
    """Score a LOC submission (read with ``read_boxes(path, ordered=True)``) against the truth."""
    predictions = {name: list(zip(b.wnids, b.xyxy)) for name, b in submission.boxes.items()}
    over = [name for name, guesses in predictions.items() if len(guesses) > TOP_K]
    if over:
        warnings.warn(f"{len(over)} image(s) of {submission.source} have more than {TOP_K} "
                      f"guesses, e.g. {over[0]} ({len(predictions[over[0]])}); only the first "
                      f"{TOP_K} of each are scored", stacklevel=2)
    unknown = set(predictions) - set(truth.boxes)
    if unknown and len(unknown) == len(predictions):
        raise InputError(f"none of the {len(predictions)} images of {submission.source} is in "
                         f"{truth.source}; is it the solution file of the same split?")
    return score_guesses(predictions, truth)


def gt_class_errors(boxes: np.ndarray, truths: list[np.ndarray], *,
                    threshold: float = IOU_THRESHOLD) -> np.ndarray:
    """Per image, 1 when the box (N×4) overlaps none of its ground-truth boxes (list of K×4) with
    IoU > ``threshold``, else 0."""
    return np.array([0.0 if len(t) and float(iou(b[None], t).max()) > threshold else 1.0
                     for b, t in zip(np.asarray(boxes), truths)])
