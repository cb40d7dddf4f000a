"""Linear classifiers of the transfer protocols and the choice of their C on held-out data.

* ``svm``: a linear SVM (the paper's), one-vs-rest, squared hinge (scikit-learn's ``LinearSVC``).
* ``logreg``: L2-regularised multinomial logistic regression, C chosen on validation data
  (Kornblith, Shlens & Le, "Do Better ImageNet Models Transfer Better?", CVPR 2019).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from sklearn.base import ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from ..choices import CLASSIFIERS
from ..errors import ConfigError

# Descriptors are L2-normalised, so useful C values are large-ish; grids are log-spaced.
C_GRIDS = {"svm": tuple(10.0 ** np.arange(-2, 3)), "logreg": tuple(10.0 ** np.arange(-1, 5))}


def make_classifier(kind: str, C: float, *, seed: int = 0) -> ClassifierMixin:
    if kind == "svm":
        return LinearSVC(C=C, max_iter=5000, random_state=seed)
    if kind == "logreg":
        return LogisticRegression(C=C, max_iter=2000)
    raise ConfigError(f"classifier must be one of {CLASSIFIERS}, got {kind!r}")


def choose_C(kind: str, grid: tuple[float, ...], fit: tuple[np.ndarray, np.ndarray],
             val: tuple[np.ndarray, np.ndarray], score: Callable[..., float], *,
             seed: int = 0) -> tuple[float, dict[float, float]]:
    """Fit on ``fit`` for every C in ``grid`` and rate it with ``score(model, X_val, y_val)``;
    returns the best C (the smallest on ties) and every C's validation score.  A grid of one
    value is returned as is, without fitting."""
    if len(grid) == 1:
        return grid[0], {}
    results = {}
    for C in grid:
        results[C] = score(fit_classifier(kind, C, *fit, seed=seed), *val)
    best = max(results.values())
    return min(C for C, s in results.items() if s == best), results


def fit_classifier(kind: str, C: float, X: np.ndarray, y: np.ndarray, *,
                   seed: int = 0) -> ClassifierMixin:
    """A ``kind`` classifier with regularisation ``C`` fitted on ``X``, ``y``."""
    with warnings.catch_warnings():
        # Convergence at the loosest C of a grid is not worth a warning per fit.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return make_classifier(kind, C, seed=seed).fit(X, y)
