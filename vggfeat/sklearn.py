"""scikit-learn estimators: VGG descriptors of image paths, and array transformers for them.

``VGGFeatures`` maps image paths to the paper's descriptors inside any ``Pipeline``::

    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC
    from vggfeat.sklearn import VGGFeatures

    clf = make_pipeline(VGGFeatures(arch="D", cache="features.h5"), LinearSVC())
    clf.fit(train_paths, train_labels)

With ``cache=`` a ``.h5`` file or a feature store (a folder), in the format ``vggfeat extract``
writes, descriptors are looked up by path and only the images not yet in the cache, or changed
since (size or mtime; rows of deleted files are still served), are computed, by ``vggfeat
extract`` itself (crash-safe and resumable); the cache then grows by those rows and keeps all
the others.  An extract output is a cache: its rows are reused when the settings match.  A
further descriptor setting is stored beside the first (a named group of the file, a sub-store
``alt/NAME`` of the store), so one cache serves a grid search over layers or scales; several
processes may use it at once (writers take turns).  ``vggfeat.load_features(cache,
group=est.cache_group_)`` reads one setting.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .cache.location import locate, refuse_remote_file
from .cache.lookup import lookup
from .cache.settings import setting_name
from .cache.sharded import is_store
from .cache.store import check_suffix, load_features
from .data.images import MAX_ASPECT
from .data.remote import is_url
from .data.sources import ImageList
from .errors import ConfigError, InputError
from .descriptors.descriptor import DescriptorSpec
from .descriptors.run import descriptor_settings, extract
from .models.backends import check_backend
from .models.factory import vgg
from .transfer.transforms import PowerNormalizer, ScaleAggregator

ON_ERROR = ("raise", "nan")

__all__ = ["VGGFeatures", "ScaleAggregator", "PowerNormalizer"]


class VGGFeatures(TransformerMixin, BaseEstimator):
    """Image paths → VGG descriptors (N × D float32), as ``vggfeat extract`` computes them.

    Parameters are those of :func:`vggfeat.vgg` (``arch``, ``weights``) and
    :class:`vggfeat.DescriptorSpec` (``layer``, ``scales`` in px, ``pool``, ``aggregate``,
    ``flip``, ``l2``, ``crop``, ``max_aspect``), plus:

    Args:
        cache: a ``.h5`` feature file or a feature store (a folder name without suffix), as
            ``vggfeat extract`` writes them, keyed by image path and file identity; further
            descriptor settings are stored beside the first (``cache_group_`` names this
            one's).  None computes every time.
        on_error: ``raise`` (name the unreadable images) or ``nan`` (give them NaN rows).
        retry_failed: try again, on every call, the images the cache records as unreadable
            (by default only those whose file changed since).
        batch_size, device, workers, amp, backend, dtype, progress: as for ``vggfeat extract``.

    ``fit`` builds the net (``model_``); it learns nothing from the data.  The input is a
    sequence of paths, or an N×1 array of them (e.g. a column chosen by a ColumnTransformer).
    """

    def __init__(self, arch: str | None = None, weights: str | None = "torchvision", *,
                 layer: str = "fc7", scales: tuple[int, ...] | None = None, pool: str = "avg",
                 aggregate: str = "mean", flip: bool | None = None, l2: bool = True,
                 crop: int | None = None, max_aspect: float = MAX_ASPECT,
                 cache: str | os.PathLike | None = None, on_error: str = "raise",
                 retry_failed: bool = False, batch_size: int = 8, device: str | None = None,
                 workers: int | None = 0, amp: str | None = None, backend: str = "auto",
                 dtype: str = "float32", progress: bool = False) -> None:
        self.arch = arch
        self.weights = weights
        self.layer = layer
        self.scales = scales
        self.pool = pool
        self.aggregate = aggregate
        self.flip = flip
        self.l2 = l2
        self.crop = crop
        self.max_aspect = max_aspect
        self.cache = cache
        self.on_error = on_error
        self.retry_failed = retry_failed
        self.batch_size = batch_size
        self.device = device
        self.workers = workers
        self.amp = amp
        self.backend = backend
        self.dtype = dtype
        self.progress = progress

    def fit(self, X=None, y=None):
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        check_backend(self.backend)
        self.spec_ = DescriptorSpec(layer=self.layer, scales=self.scales, pool=self.pool,
                                    aggregate=self.aggregate, flip=self.flip, l2=self.l2,
                                    crop=self.crop, max_aspect=self.max_aspect)
        self.model_ = vgg(self.arch, weights=self.weights, progress=self.progress).eval()
        self.model_.check_layer(self.layer)
        self._n_features_out = self.spec_.dim(self.model_.layer_channels(self.layer))
        self.cache_group_ = setting_name(self._settings())
        return self

    def transform(self, X) -> np.ndarray:
        check_is_fitted(self, "model_")
        paths = _as_paths(X)
        rows, failed = self._cached(paths) if self.cache is not None else self._compute(paths)
        bad = [p for p in dict.fromkeys(paths) if p in failed]
        if bad and self.on_error == "raise":
            listed = "; ".join(f"{p}: {failed[p]}" for p in bad[:5])
            raise InputError(f"{len(bad)} image(s) could not be read ({listed}); fix or remove "
                             "them, or use on_error='nan'")
        out = np.full((len(paths), self._n_features_out), np.nan, dtype=np.float32)
        for i, p in enumerate(paths):
            if p in rows:
                out[i] = rows[p]
        return out

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """``fc7_0`` … (mean), or ``fc7_q256_0`` … per scale (stack)."""
        check_is_fitted(self, "model_")
        name = self.layer.replace(":", "_")
        channels = self.model_.layer_channels(self.layer)
        if self.aggregate == "stack":
            return np.array([f"{name}_q{q}_{i}" for q in self.spec_.scales
                             for i in range(channels)], dtype=object)
        return np.array([f"{name}_{i}" for i in range(channels)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = True
        return tags

    # -- computing ---------------------------------------------------------------------------

    def _settings(self) -> dict:
        return descriptor_settings(self.model_, self.spec_, self.dtype)

    def _extract(self, paths: list[str], output: Path, add: bool = False) -> None:
        extract(ImageList(paths), output, spec=self.spec_, model=self.model_,
                batch_size=self.batch_size, workers=self.workers, device=self.device,
                dtype=self.dtype, amp=self.amp, backend=self.backend, progress=self.progress,
                add=add, retry_failed=self.retry_failed)

    def _compute(self, paths: list[str]) -> tuple[dict, dict]:
        with tempfile.TemporaryDirectory(prefix="vggfeat-") as tmp:
            output = Path(tmp) / "features.h5"
            self._extract(list(dict.fromkeys(paths)), output)
            return _rows(load_features(output))

    def _cached(self, paths: list[str]) -> tuple[dict, dict]:
        cache = locate(self.cache)  # a path, or a store in a bucket (vggfeat.cache.location)
        store = is_store(cache)
        if not store:
            refuse_remote_file(cache, "cache")
            check_suffix(cache, "cache")
        unique = list(dict.fromkeys(paths))
        found = lookup(cache, self._settings(), unique, retry_failed=self.retry_failed,
                       store=store)
        if found.todo:
            # extract's own planning, under the cache's lock (writers take turns), finds the
            # rows another process added meanwhile; the others' rows are kept (add=True).
            self._extract(found.todo, cache, add=True)
            found = lookup(cache, self._settings(), unique, store=store)
            for path in found.todo:  # changed again while it was being computed
                found.failed.setdefault(path, "the file changed while its descriptor was "
                                        "computed: call again")
        return found.rows, found.failed


def _rows(bunch) -> tuple[dict, dict]:
    """path → descriptor row, and path → failure reason, of a loaded feature file."""
    return dict(zip(bunch.paths, bunch.data)), dict(bunch.failed)


def _as_paths(X) -> list[str]:
    array = np.asarray(X, dtype=object)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1 or not all(isinstance(p, (str, os.PathLike)) for p in array):
        raise TypeError("VGGFeatures transforms image paths: give a list of file paths or URLs "
                        f"(or an N×1 array of them), not {type(X).__name__} of shape "
                        f"{array.shape}")
    return [str(p) if is_url(str(p)) else os.path.abspath(p) for p in array]
