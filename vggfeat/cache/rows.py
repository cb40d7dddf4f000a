"""A row-indexable view of the features of one or more HDF5 files, read on demand.

Loading a large feature file or store with ``lazy=True`` gives one of these instead of an array:
``view[10:20]``, ``view[[5, 3, 900]]``, ``view[mask]`` read only those rows.  Files are opened
when first read, at most ``max_open`` at a time (least recently used closed first), and each is
checked to be the very file (same inode, size and mtime) the view was made from, so rows never
shift under a reader: a file replaced since is an error naming it, never other images' rows
(an object in a bucket: the same URL, size and ETag).
``close()`` (or ``with``) closes what is open; so does dropping the view.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import h5py
import numpy as np

from ..errors import CacheError
from .location import Where, open_h5, version


@dataclass(frozen=True)
class RowSource:
    """``n_rows`` rows of ``group``/features in ``file``, whose stat was ``key`` when listed:
    rows ``0 … n_rows−1``, or the file's rows ``rows`` (live rows of a store's shard)."""

    file: Where
    n_rows: int
    key: tuple
    group: str = "/"
    rows: np.ndarray | None = None


def stat_key(path: Where | h5py.File) -> tuple:
    """What identifies one version of a file; of an open HDF5 file, the version it has open
    (see vggfeat.cache.location.version)."""
    return version(path)


def _close_all(handles: OrderedDict) -> None:
    for f in handles.values():
        f.close()
    handles.clear()


class FeatureRows:
    """Rows ``0 … len−1`` of the sources, one after another (see the module's docstring)."""

    def __init__(self, sources: list[RowSource], dim: int, dtype, *, max_open: int = 16,
                 order: np.ndarray | None = None) -> None:
        """``order[i]``: where row ``i`` is among the sources' rows laid end to end (default:
        in that order)."""
        self.sources, self.dim, self.dtype = list(sources), int(dim), np.dtype(dtype)
        self.max_open = max(1, max_open)
        self.offsets = np.cumsum([0] + [s.n_rows for s in self.sources])
        self.order = order
        self._handles: OrderedDict[int, h5py.File] = OrderedDict()
        self._finalizer = weakref.finalize(self, _close_all, self._handles)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.offsets[-1]), self.dim

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return (f"FeatureRows({self.shape[0]}×{self.dim} {self.dtype}, {len(self.sources)} "
                f"file(s), {len(self._handles)} open)")

    def close(self) -> None:
        _close_all(self._handles)

    def __enter__(self) -> FeatureRows:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, tuple):
            rows, cols = key
            return self[rows][:, cols] if not np.isscalar(rows) else self[rows][cols]
        n = len(self)
        if isinstance(key, (int, np.integer)):
            if not -n <= key < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            return self.take(np.array([key % n]))[0]
        if isinstance(key, slice):
            return self.take(np.arange(n)[key])
        index = np.asarray(key)
        if index.dtype == bool:
            if index.shape != (n,):
                raise IndexError(f"a boolean mask must have {n} entries, got {index.shape}")
            index = np.flatnonzero(index)
        if index.dtype.kind not in "iu":
            raise IndexError(f"rows are chosen by int, slice, int array or mask, not {key!r}")
        if len(index) and (index.max() >= n or index.min() < -n):
            raise IndexError(f"row index out of range for {n} rows")
        return self.take(index % n if len(index) else index.astype(np.int64))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (non-negative ints, any order, repeats allowed), as an array."""
        rows = np.asarray(rows, np.int64)
        if self.order is not None:
            rows = self.order[rows]
        out = np.empty((len(rows), self.dim), self.dtype)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for k in np.unique(which):
            at = np.flatnonzero(which == k)
            local = rows[at] - self.offsets[k]
            out[at] = self._read(int(k), local)
        return out

    def blocks(self, rows: int = 65536):
        """Consecutive blocks of at most ``rows`` rows, as arrays: (start, block) pairs."""
        for lo in range(0, len(self), rows):
            yield lo, self[lo:lo + rows]

    def _read(self, k: int, local: np.ndarray) -> np.ndarray:
        feats = self._open(k)
        if self.sources[k].rows is not None:
            local = self.sources[k].rows[local]
        wanted, back = np.unique(local, return_inverse=True)
        lo, hi = int(wanted[0]), int(wanted[-1]) + 1
        if hi - lo <= 4 * len(wanted):  # dense enough: one contiguous read
            block = feats[lo:hi][wanted - lo]
        else:
            block = feats[wanted]
        return block[back.reshape(-1)]

    def _open(self, k: int):
        source = self.sources[k]
        if k in self._handles:
            self._handles.move_to_end(k)
        else:
            try:  # the version opened is checked, not the name's before opening it
                f = open_h5(source.file)
            except OSError as err:
                raise CacheError(f"cannot read {source.file} ({err}): load the features "
                                 "again") from err
            if stat_key(f) != source.key:
                f.close()
                raise CacheError(f"{source.file} changed since its rows were listed (a "
                                 "writer replaced it): load the features again")
            self._handles[k] = f
            if len(self._handles) > self.max_open:
                self._handles.popitem(last=False)[1].close()
        return self._handles[k][source.group]["features"]
