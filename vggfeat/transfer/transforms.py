"""Array transformers for descriptors, usable in any scikit-learn pipeline.

``ScaleAggregator`` turns per-scale stacked descriptors (N × S·D, as stored by ``vggfeat extract
--aggregate stack``) into the mean over scales (N × D) or keeps the stack; follow it with
scikit-learn's ``Normalizer()`` for the paper's L2 normalisation.  ``PowerNormalizer`` is the
signed power ("square-rooting") normalisation often applied before L2.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    OneToOneFeatureMixin,
    TransformerMixin,
)
from sklearn.utils.validation import check_is_fitted, validate_data

from ..errors import ConfigError
from ..descriptors.descriptor import AGGREGATES


class ScaleAggregator(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Combine ``n_scales`` equal blocks of columns by ``mean`` or keep them stacked (``stack``).

    Input N × (n_scales·D), scale-major as written by ``--aggregate stack``; output N × D
    (mean) or unchanged N × (n_scales·D) (stack).
    """

    def __init__(self, n_scales: int = 1, aggregate: str = "mean") -> None:
        self.n_scales = n_scales
        self.aggregate = aggregate

    def fit(self, X, y=None):
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        X = validate_data(self, X, dtype=[np.float32, np.float64])
        if not isinstance(self.n_scales, int) or self.n_scales < 1 or X.shape[1] % self.n_scales:
            raise ConfigError(f"n_scales={self.n_scales!r} must be a positive integer dividing the "
                             f"{X.shape[1]} features into equal per-scale blocks")
        self._n_features_out = X.shape[1] // (self.n_scales if self.aggregate == "mean" else 1)
        return self

    def transform(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False)
        if self.aggregate == "stack":
            return X
        return X.reshape(X.shape[0], self.n_scales, -1).mean(axis=1)


class PowerNormalizer(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Signed power normalisation ``sign(x)·|x|^alpha`` (alpha = 0.5: square-rooting)."""

    def __init__(self, alpha: float = 0.5) -> None:
        self.alpha = alpha

    def fit(self, X, y=None):
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha!r}")
        validate_data(self, X, dtype=[np.float32, np.float64])
        return self

    def transform(self, X):
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False)
        return np.sign(X) * np.abs(X) ** self.alpha
