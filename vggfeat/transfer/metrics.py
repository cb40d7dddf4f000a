"""Scores of the transfer protocols: VOC average precision and mean class recall."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from ..errors import ConfigError, InputError

AP_METRICS = ("11point", "area")


def voc_ap(labels: np.ndarray, scores: np.ndarray, *, metric: str = "11point") -> float:
    """Average precision of one class as the VOC devkit computes it, in [0, 1].

    Args:
        labels: N values, 1 positive, -1 negative, 0 difficult (ignored, as in VOC).
        scores: N classifier scores; higher means more confident.
        metric: ``11point`` (VOC2007: mean of the interpolated precision at recall 0, 0.1 … 1)
            or ``area`` (VOC2010 on: area under the monotone precision envelope).
    """
    if metric not in AP_METRICS:
        raise ConfigError(f"metric must be one of {AP_METRICS}, got {metric!r}")
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    keep = labels != 0
    labels, scores = labels[keep], scores[keep]
    n_pos = int((labels > 0).sum())
    if n_pos == 0:
        raise InputError("no positive example: average precision is undefined")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(labels[order] > 0)
    fp = np.cumsum(labels[order] < 0)
    recall = tp / n_pos
    precision = tp / (tp + fp)
    if metric == "11point":
        return float(np.mean([precision[recall >= t].max(initial=0.0)
                              for t in np.linspace(0, 1, 11)]))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def mean_class_recall(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """The Caltech metric: recall averaged over classes (scikit-learn's balanced accuracy)."""
    return float(balanced_accuracy_score(y_true, y_pred))
