"""The HDF5 feature cache: crash-safe shards while a run is going, one file when it is done.

While a run is in progress, results go to ``OUT.h5.parts/``: a ``manifest.json`` holding the
settings and the input fingerprint, and shard files, each written under a temporary name and
published by an atomic rename, so a shard is either complete or absent whatever kills the
process.  A re-run reads the shards, skips what they cover and computes the rest.  When every
image is covered, the shards are merged in input order into ``OUT.h5`` (again via a temporary
file and a rename) and the parts folder is removed.

Layout of the finished file (see docs/extract.md):

* ``features``      N×D float32/float16, chunked by whole rows (~1 MiB chunks)
* ``paths``         N UTF-8 strings, the images in input order
* ``labels``        N int64, and ``class_names`` K strings, when the input has classes
* ``input_sizes``   N×S×2 int32, the network input (H, W) actually used at each scale
* ``failed/paths``, ``failed/reasons``  the files that could not be used, and why
* attributes: the settings (arch, layer, weights and their hash, scales, …) and versions
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from sklearn.utils import Bunch

from ..errors import CacheError

CHUNK_BYTES = 1 << 20
STR = h5py.string_dtype("utf-8")
MANIFEST = "manifest.json"


def parts_dir(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def row_chunks(n_rows: int, dim: int, dtype) -> tuple[int, int]:
    """Chunk shape holding whole rows, about 1 MiB (e.g. 64×4096 float32)."""
    rows = max(1, CHUNK_BYTES // (dim * np.dtype(dtype).itemsize))
    return min(rows, n_rows), dim


# -- manifest --------------------------------------------------------------------------------------

def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name beside ``path``, then rename: whole or absent."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def read_manifest(parts: Path) -> dict | None:
    try:
        return json.loads((parts / MANIFEST).read_text())
    except FileNotFoundError:
        return None


def settings_difference(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


# -- shards ----------------------------------------------------------------------------------------

@dataclass
class Shard:
    path: Path
    index: np.ndarray  # input indices of the good rows, increasing
    failed_index: np.ndarray
    failed_reasons: list[str]


def write_shard(parts: Path, *, rank: int, index: np.ndarray, features: np.ndarray,
                input_sizes: np.ndarray, failed_index: np.ndarray, failed_reasons: list[str],
                dtype: str) -> Path:
    """Publish one shard atomically: it appears complete under its final name, or not at all."""
    first = int(min(index.min(initial=1 << 62), failed_index.min(initial=1 << 62)))
    final = parts / f"shard-r{rank:03d}-{first:010d}-{uuid.uuid4().hex[:8]}.h5"
    tmp = final.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as f:
        f["index"] = index.astype(np.int64)
        f.create_dataset("features", data=features.astype(dtype), dtype=dtype)
        f["input_sizes"] = input_sizes.astype(np.int32)
        f["failed_index"] = failed_index.astype(np.int64)
        f.create_dataset("failed_reasons", data=failed_reasons, dtype=STR)
    with open(tmp, "rb") as fh:  # the data must be on disk before the name says it is
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


def read_shards(parts: Path) -> list[Shard]:
    """All published shards; temporary files of interrupted writes are ignored."""
    shards = []
    for path in sorted(parts.glob("shard-*.h5")):
        with h5py.File(path, "r") as f:
            shards.append(Shard(path, f["index"][:], f["failed_index"][:],
                                [r.decode() if isinstance(r, bytes) else r
                                 for r in f["failed_reasons"][:]]))
    return shards


def covered(shards: list[Shard]) -> np.ndarray:
    """Sorted input indices already done (computed or recorded as failed)."""
    parts = [s.index for s in shards] + [s.failed_index for s in shards]
    done = np.concatenate(parts) if parts else np.empty(0, np.int64)
    if len(np.unique(done)) != len(done):
        raise CacheError("shards overlap: an image was computed twice; the parts folder was "
                         "written by two different runs at once. Remove it and run again.")
    return np.sort(done)


# -- merge -----------------------------------------------------------------------------------------

def merge(parts: Path, output: Path, *, paths: list[str], labels: list[int] | None,
          class_names: list[str] | None, attrs: dict, dim: int, n_scales: int, dtype: str) -> Path:
    """Join the shards into ``output`` in input order; atomic; removes ``parts`` afterwards."""
    shards = read_shards(parts)
    done = covered(shards)
    if len(done) != len(paths) or (len(done) and done[-1] != len(paths) - 1):
        raise CacheError(f"cannot finish {output}: {len(paths) - len(done)} of {len(paths)} images "
                         "are not computed yet; run the same command again to complete it")
    good = np.sort(np.concatenate([s.index for s in shards])) if shards else np.empty(0, np.int64)
    failed = sorted((int(i), r) for s in shards for i, r in zip(s.failed_index, s.failed_reasons))
    tmp = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.tmp")
    with h5py.File(tmp, "w") as f:
        feats = f.create_dataset("features", shape=(len(good), dim), dtype=dtype,
                                 chunks=row_chunks(len(good), dim, dtype) if len(good) else None)
        sizes = f.create_dataset("input_sizes", shape=(len(good), n_scales, 2), dtype=np.int32)
        for shard in shards:
            if not len(shard.index):
                continue
            rows = np.searchsorted(good, shard.index)
            with h5py.File(shard.path, "r") as src:
                values, shard_sizes = src["features"][:], src["input_sizes"][:]
            # Rows of a shard are consecutive in the output unless other ranks' rows interleave.
            for run in np.split(np.arange(len(rows)), np.flatnonzero(np.diff(rows) != 1) + 1):
                lo, hi = rows[run[0]], rows[run[-1]] + 1
                feats[lo:hi] = values[run]
                sizes[lo:hi] = shard_sizes[run]
        f.create_dataset("paths", data=[paths[i] for i in good], dtype=STR)
        if labels is not None:
            f["labels"] = np.asarray([labels[i] for i in good], dtype=np.int64)
            f.create_dataset("class_names", data=class_names, dtype=STR)
        group = f.create_group("failed")
        group.create_dataset("paths", data=[paths[i] for i, _ in failed], dtype=STR)
        group.create_dataset("reasons", data=[r for _, r in failed], dtype=STR)
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["num_images"] = len(good)
        f.attrs["num_failed"] = len(failed)
    os.replace(tmp, output)
    shutil.rmtree(parts, ignore_errors=True)
    return output


# -- reading ---------------------------------------------------------------------------------------

def _strings(dataset) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else s for s in dataset[:]]


def read_attrs(path: str | os.PathLike) -> dict:
    with h5py.File(path, "r") as f:
        return {k: _plain(v) for k, v in f.attrs.items()}


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def load_features(path: str | os.PathLike, *, return_X_y: bool = False, lazy: bool = False):
    """Read a vggfeat feature file.

    Returns a scikit-learn ``Bunch`` with ``data`` (N×D), ``target`` (N labels or None),
    ``target_names`` (class names or None), ``paths``, ``failed`` (list of (path, reason)),
    ``attrs`` (settings) and ``input_sizes``; or ``(X, y)`` with ``return_X_y=True``.

    With ``lazy=True``, ``data`` is the open ``h5py.Dataset`` (slice it to read rows) and the
    Bunch's ``file`` must be closed by the caller (``bunch.file.close()``).
    """
    path = Path(path)
    if not path.is_file():
        parts = parts_dir(path)
        hint = (f"; {parts} holds an unfinished run: run the same extract command again to finish "
                "it") if parts.is_dir() else ""
        raise FileNotFoundError(f"feature file {path} does not exist{hint}")
    f = h5py.File(path, "r")
    try:
        if "features" not in f or "paths" not in f:
            raise CacheError(f"{path} is not a vggfeat feature file (no 'features'/'paths')")
        data = f["features"] if lazy else f["features"][:]
        target = f["labels"][:] if "labels" in f else None
        if return_X_y:
            return data, target
        failed = list(zip(_strings(f["failed/paths"]), _strings(f["failed/reasons"])))
        return Bunch(data=data, target=target,
                     target_names=_strings(f["class_names"]) if "class_names" in f else None,
                     paths=_strings(f["paths"]), failed=failed,
                     input_sizes=f["input_sizes"][:],
                     attrs={k: _plain(v) for k, v in f.attrs.items()},
                     file=f if lazy else None)
    finally:
        if not lazy:
            f.close()


# -- growing a path-keyed cache --------------------------------------------------------------------

def append_file(cache: Path, new: Path, *, attrs: dict) -> Path:
    """Write ``cache`` + the rows of the feature file ``new`` as the new ``cache`` (atomically).

    Used by caches keyed by image path (:class:`vggfeat.sklearn.VGGFeatures`), which grow with
    every call; ``attrs`` replaces the file's settings (without per-input keys).
    """
    sources = [p for p in (cache, new) if p.exists()]
    parts = [load_features(p) for p in sources]
    tmp = cache.with_name(f".{cache.name}.{uuid.uuid4().hex[:8]}.tmp")
    features = np.concatenate([b.data for b in parts])
    with h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=features,
                         chunks=row_chunks(len(features), features.shape[1], features.dtype)
                         if len(features) else None)
        f["input_sizes"] = np.concatenate([b.input_sizes for b in parts])
        f.create_dataset("paths", data=[p for b in parts for p in b.paths], dtype=STR)
        group = f.create_group("failed")
        group.create_dataset("paths", data=[p for b in parts for p, _ in b.failed], dtype=STR)
        group.create_dataset("reasons", data=[r for b in parts for _, r in b.failed], dtype=STR)
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["num_images"] = len(features)
        f.attrs["num_failed"] = sum(len(b.failed) for b in parts)
    os.replace(tmp, cache)
    return cache
