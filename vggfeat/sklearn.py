"""scikit-learn estimators: VGG descriptors of image paths, and array transformers for them.

``VGGFeatures`` maps image paths to the paper's descriptors inside any ``Pipeline``::

    from sklearn.pipeline import make_pipeline
    from sklearn.svm import LinearSVC
    from vggfeat.sklearn import VGGFeatures

    clf = make_pipeline(VGGFeatures(arch="D", cache="features.h5"), LinearSVC())
    clf.fit(train_paths, train_labels)

With ``cache=`` an HDF5 file, descriptors are looked up by path and only the images not yet in
the cache, or changed since (size or mtime; rows of deleted files are still served), are
computed (crash-safe and resumable, like ``vggfeat extract``); the cache then grows by those
rows.  The file holds one group per descriptor setting, so one cache serves a grid search over
layers or scales; several processes may use it at once (writers take turns).  ``vggfeat.load_features(cache, group=...)`` reads it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from .cache.lock import OutputLock
from .cache.store import (
    FileIds,
    Index,
    Rows,
    check_suffix,
    descriptor_groups,
    index_of,
    io_error,
    load_features,
    open_features,
    parts_dir,
    read_index,
    write_group,
)
from .cache.update import plan_update
from .errors import CacheError, ConfigError, InputError
from .fileio import atomic_path
from .data.images import MAX_ASPECT
from .data.sources import ImageList
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
        cache: an HDF5 file of descriptors keyed by image path and file identity, one group per
            descriptor setting (``cache_group_``); None computes every time.
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
        settings = self._settings()
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        self.cache_group_ = f"{self.layer.replace(':', '_')}-{digest[:12]}"
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

    def _extract(self, paths: list[str], output: Path) -> tuple[dict, dict]:
        extract(ImageList(paths), output, spec=self.spec_, model=self.model_,
                batch_size=self.batch_size, workers=self.workers, device=self.device,
                dtype=self.dtype, amp=self.amp, backend=self.backend, progress=self.progress)
        return _rows(load_features(output))

    def _compute(self, paths: list[str]) -> tuple[dict, dict]:
        with tempfile.TemporaryDirectory(prefix="vggfeat-") as tmp:
            return self._extract(list(dict.fromkeys(paths)), Path(tmp) / "features.h5")

    def _cached(self, paths: list[str]) -> tuple[dict, dict]:
        cache = Path(self.cache)
        check_suffix(cache, "cache")
        unique = list(dict.fromkeys(paths))
        rows, failed, todo, _ = self._lookup(cache, unique)
        if todo:
            # One writer at a time; a process that waited finds what the other one computed.
            with OutputLock(cache, wait=True):
                # the cache cannot change while we hold the lock
                rows, failed, todo, index = self._lookup(cache, unique)
                if todo:
                    new_rows, new_failed = self._add(cache, todo, index)
                    rows.update(new_rows)
                    failed.update(new_failed)
        return rows, failed

    def _lookup(self, cache: Path, paths: list[str]) -> tuple[dict, dict, list[str], Index | None]:
        """Rows and failures the cache holds for unchanged files, the paths to compute, and the
        index of this setting's group (None: none yet).

        The index and the rows are read through one open of the file: a writer publishes a new
        version by renaming over the name, so the open version stays whole and rows never shift.
        """
        if not cache.exists():
            return {}, {}, paths, None
        with open_features(cache) as f:
            groups = descriptor_groups(f)
            if groups == ["/"]:
                raise CacheError(f"{cache} is a feature file written by vggfeat extract (or an "
                                 "older vggfeat), not a VGGFeatures cache: choose another cache "
                                 "file")
            if self.cache_group_ not in groups:
                return {}, {}, paths, None
            index = index_of(f, cache, self.cache_group_)
            # A deleted image cannot have changed: its row is still served (images may be
            # removed once their descriptors are cached).
            plan = plan_update(paths, [index], retry_failed=self.retry_failed, keep_deleted=True)
            found = np.flatnonzero(plan.source >= 0)
            good = found[plan.entry[found] < index.n_rows]
            order = np.argsort(plan.entry[good])
            feats = f[self.cache_group_]["features"]
            data = feats[np.sort(plan.entry[good])] if len(good) else []
        rows = {paths[i]: data[k] for k, i in zip(range(len(good)), good[order])}
        failed = {paths[i]: index.reasons[plan.entry[i] - index.n_rows]
                  for i in np.setdiff1d(found, good)}
        return rows, failed, [paths[i] for i in plan.compute], index

    def _add(self, cache: Path, todo: list[str], old: Index | None) -> tuple[dict, dict]:
        """Compute ``todo`` and write the cache (``old``: its group) with them (atomically; other
        groups kept)."""
        # Named after its inputs, so a killed call resumes when called again on the same data.
        pending = cache.with_name(f".{cache.name}.{self.cache_group_}-"
                                  f"{ImageList(todo).fingerprint()[:12]}.h5")
        for leftover in cache.parent.glob(f".{glob.escape(cache.name)}.*.h5"):
            if leftover != pending:  # of killed calls: we hold the lock, no one writes them
                leftover.unlink(missing_ok=True)
                shutil.rmtree(parts_dir(leftover), ignore_errors=True)
        new_rows, new_failed = self._extract(todo, pending)
        new = read_index(pending)
        sources = [old, new] if old else [new]
        replaced = set(new.paths)
        keep = [np.array([e for e, p in enumerate(s.paths) if s is new or p not in replaced],
                         np.int64) for s in sources]
        row_parts = [(k, e[e < s.n_rows]) for k, (s, e) in enumerate(zip(sources, keep))]
        fail_parts = [(k, e[e >= s.n_rows]) for k, (s, e) in enumerate(zip(sources, keep))]
        rows = Rows([s.file for s in sources],
                    np.concatenate([np.full(len(e), k) for k, e in row_parts]),
                    np.concatenate([e for _, e in row_parts]), [s.group for s in sources])
        try:
            with atomic_path(cache) as tmp, h5py.File(tmp, "w") as dst:
                if cache.exists():
                    with h5py.File(cache, "r") as src:
                        for name in descriptor_groups(src):
                            if name != self.cache_group_:
                                src.copy(src[name], dst, name=name)
                write_group(
                    dst.create_group(self.cache_group_), rows,
                    paths=[sources[k].paths[e] for k, es in row_parts for e in es],
                    ids=FileIds.concat([sources[k].ids.take(e) for k, e in row_parts]),
                    labels=None, class_names=None,
                    failed_paths=[sources[k].paths[e] for k, es in fail_parts for e in es],
                    failed_reasons=[sources[k].reasons[e - sources[k].n_rows]
                                    for k, es in fail_parts for e in es],
                    failed_ids=FileIds.concat([sources[k].ids.take(e) for k, e in fail_parts]),
                    attrs=self._settings(), dim=self._n_features_out,
                    n_scales=len(self.spec_.scales), dtype=self.dtype)
        except OSError as err:
            raise io_error(err, "write the cache") from err
        pending.unlink()
        return new_rows, new_failed


def _rows(bunch) -> tuple[dict, dict]:
    """path → descriptor row, and path → failure reason, of a loaded feature file."""
    return dict(zip(bunch.paths, bunch.data)), dict(bunch.failed)


def _as_paths(X) -> list[str]:
    array = np.asarray(X, dtype=object)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1 or not all(isinstance(p, (str, os.PathLike)) for p in array):
        raise TypeError("VGGFeatures transforms image paths: give a list of file paths (or an N×1 "
                        f"array of them), not {type(X).__name__} of shape {array.shape}")
    return [os.path.abspath(p) for p in array]
