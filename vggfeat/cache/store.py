"""The HDF5 feature cache: crash-safe shards while a run is going, one file when it is done.

While a run is in progress, new results go to ``OUT.h5.parts/``: a ``manifest.json`` holding the
descriptor settings, and shard files, each built in memory and published by an atomic rename, so
a shard is either complete or absent whatever kills the process.  Every row (and every recorded
failure) carries the identity of the file it was computed from: path, size, mtime and SHA-256 of
the content.  A rerun reuses the rows whose file is unchanged, computes the rest, and joins them
in input order into ``OUT.h5`` (again via a temporary file and a rename), streaming in blocks so
memory stays bounded whatever the number of rows.

Layout of a finished file (see docs/extract.md); shards have the same layout without labels:

* ``features``      N×D float32/float16, chunked by whole rows (~1 MiB chunks)
* ``paths``         N UTF-8 strings, the images in input order
* ``file_size``, ``file_mtime_ns`` N int64, ``file_sha256`` N×32 uint8: the file each row is of
* ``labels``        N int64, and ``class_names`` K strings, when the input has classes
* ``input_sizes``   N×S×2 int32, the network input (H, W) actually used at each scale
* ``failed/paths``, ``failed/reasons``, ``failed/file_*``: the files that could not be used, and why
* attributes: the settings (arch, layer, weights and their hash, scales, …) and versions
"""

from __future__ import annotations

import errno
import io
import multiprocessing
import os
import shutil
import sys
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain, compress
from pathlib import Path

import h5py
import numpy as np

from ..choices import FETCH_CONCURRENCY, HDF5_SUFFIXES
from ..data.remote import is_url
from ..errors import CacheError, InputError
from ..fileio import atomic_path, leftovers, sha256_file
from . import location
from .location import Where, is_remote, listing, locate, open_h5
from .rows import FeatureRows, RowSource, stat_key

CHUNK_BYTES = 1 << 20
BLOCK_BYTES = 64 << 20  # rows copied per step of a merge: what a merge holds in memory
STR = h5py.string_dtype("utf-8")
MANIFEST = "manifest.json"
MISSING = -1  # file_size of a file that did not exist


def parts_dir(output: Path, group: str = "/") -> Path:
    """Where a run keeps its work until done: ``OUT.h5.parts`` for the file's root setting,
    ``OUT.h5.NAME.parts`` for the setting of group ``NAME`` (see :mod:`.settings`)."""
    if group.strip("/"):
        return output.with_name(f"{output.name}.{group.strip('/')}.parts")
    return output.with_name(output.name + ".parts")


def row_chunks(n_rows: int, dim: int, dtype) -> tuple[int, int]:
    """Chunk shape holding whole rows, about 1 MiB (e.g. 64×4096 float32)."""
    rows = max(1, CHUNK_BYTES // (dim * np.dtype(dtype).itemsize))
    return min(rows, n_rows), dim


def check_suffix(path: Path, what: str = "output") -> None:
    if path.suffix.lower() not in HDF5_SUFFIXES:
        raise CacheError(f"{what} {path} must be named .h5 or .hdf5: vggfeat writes HDF5 files "
                         f"(e.g. {path.with_suffix('.h5').name})"
                         + (f", or a feature store: a folder name without suffix (e.g. "
                            f"{path.with_suffix('').name})" if what == "output" else ""))


def io_error(err: OSError, action: str, path: str | os.PathLike | None = None) -> CacheError:
    """A clear message for an OS error while writing a cache (disk full, read-only, …)."""
    advice = {
        errno.ENOSPC: "the disk is full: free some space (or choose another folder) and run "
                      "again; rows already published are kept",
        errno.EDQUOT: "the disk quota is exceeded: free some space and run again",
        errno.EROFS: "the file system is read-only: choose an output on a writable one",
        errno.EACCES: "permission denied: choose a folder you can write to, or fix its "
                      "permissions",
        errno.EPERM: "the operation is not permitted (an immutable or protected file?): choose "
                     "another output",
    }.get(err.errno, "run again once the cause is fixed")
    if (err.errno == errno.EPERM and path is not None and not is_remote(path)
            and _immutable(Path(path))):
        advice = ("it is immutable or append-only (chattr +i/+a): remove that attribute "
                  "(chattr -i, as root) to update it, or choose another output")
    named = path if path is not None else err.filename
    target = f" {named}" if named else ""
    return CacheError(f"cannot {action}{target}: {err.strerror or err}; {advice}")


def check_writable(output: Path, group: str = "/") -> None:
    """Refuse early, before any work, an output that could not be written at the end."""
    folder = output.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise io_error(err, "create the output folder") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CacheError(f"cannot write in {folder} (permission denied or read-only file "
                         "system): choose an output in a folder you can write to")
    check_name_length(output)
    if output.exists() and not os.access(output, os.W_OK):
        if _immutable(output):
            raise CacheError(f"{output} is immutable or append-only (chattr +i/+a): remove that "
                             "attribute (chattr -i, as root) to update it, or choose another "
                             "output")
        raise CacheError(f"{output} is read-only: make it writable (chmod u+w) to update it, or "
                         "choose another output")
    for beside in (parts_dir(output, group), output.with_name(output.name + ".lock")):
        if beside.is_symlink():
            raise CacheError(f"{beside} is a symbolic link (to {os.readlink(beside)}), which "
                             "vggfeat never follows: remove it and run again")


# Names derived from an output's: ``.OUT.<8 hex>.tmp`` (atomic writes) is the longest.
DERIVED_EXTRA = len(".") + len(".12345678") + len(".tmp")


def check_name_length(output: Path, extra: int = DERIVED_EXTRA) -> None:
    """Refuse, before any work, an output whose temporary, lock or parts names would be too
    long for its file system (they add up to ``extra`` bytes to its name)."""
    try:
        limit = os.pathconf(output.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    size = len(os.fsencode(output.name))
    if size + extra > limit:
        raise CacheError(f"output name {output.name!r} is {size} bytes long; the files vggfeat "
                         f"writes beside it (e.g. .{output.name}.XXXXXXXX.tmp) add {extra}, and "
                         f"this file system allows {limit}: choose a name of at most "
                         f"{limit - extra} bytes")


def _immutable(path: Path) -> bool:
    """True when ``path`` cannot be opened for writing even by its owner: EPERM (immutable or
    append-only attribute), as opposed to EACCES (permissions).  A folder (a store) is
    probed by creating an entry in it, which only an immutable folder refuses with EPERM."""
    if path.is_dir() and not path.is_symlink():
        probe = path / f".vggfeat-probe-{os.getpid()}-{os.urandom(4).hex()}"
        try:
            probe.mkdir()
        except OSError as err:
            return err.errno == errno.EPERM
        probe.rmdir()
        return False
    try:
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        return err.errno == errno.EPERM
    os.close(fd)
    return False


def remove_leftovers(output: Path, group: str = "/") -> int:
    """Delete temporary files of killed writes (only while holding the output's lock)."""
    parts = parts_dir(output, group)
    found = leftovers(output.parent, output.name)
    if parts.is_dir():
        found += leftovers(parts) + list(parts.glob("*.h5.tmp"))
    for path in found:
        path.unlink(missing_ok=True)
    return len(found)


def readable_size(size: float) -> str:
    """``size`` bytes in the largest binary unit that keeps it at least 1 (e.g. 15.5 KiB)."""
    units, power = ("bytes", "KiB", "MiB", "GiB", "TiB"), 0
    while size >= 1024 and power < len(units) - 1:
        size, power = size / 1024, power + 1
    return f"{size:.0f} bytes" if power == 0 else f"{size:.1f} {units[power]}"


def check_free_space(folder: Path, needed: int, action: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise CacheError(f"cannot {action}: it needs about {readable_size(needed)} and "
                         f"{folder} has {readable_size(free)} free; free some space (or choose "
                         "another folder) and run again; computed rows are kept")


# -- file identities -------------------------------------------------------------------------------

@dataclass
class FileIds:
    """What each row was computed from: size (−1: missing), mtime in ns, SHA-256 (0: unknown)."""

    size: np.ndarray
    mtime_ns: np.ndarray
    sha256: np.ndarray

    @classmethod
    def empty(cls, n: int = 0) -> FileIds:
        return cls(np.full(n, MISSING, np.int64), np.zeros(n, np.int64),
                   np.zeros((n, 32), np.uint8))

    @classmethod
    def of(cls, identities) -> FileIds:
        """From ``(size, mtime_ns, sha256 bytes)`` triples."""
        ids = cls.empty(len(identities))
        for i, (size, mtime_ns, sha) in enumerate(identities):
            ids.size[i], ids.mtime_ns[i] = size, mtime_ns
            ids.sha256[i] = np.frombuffer(sha, np.uint8)
        return ids

    @classmethod
    def concat(cls, parts: list[FileIds]) -> FileIds:
        if not parts:
            return cls.empty()
        return cls(*(np.concatenate([getattr(p, k) for p in parts])
                     for k in ("size", "mtime_ns", "sha256")))

    def __len__(self) -> int:
        return len(self.size)

    def take(self, index) -> FileIds:
        return FileIds(self.size[index], self.mtime_ns[index], self.sha256[index])

    def copy(self) -> FileIds:
        return FileIds(self.size.copy(), self.mtime_ns.copy(), self.sha256.copy())


def stat_files(paths: list[str]) -> FileIds:
    """Size and mtime of each file now (size −1 for a missing one); no content is read.  A URL's
    come from its metadata (an HTTP or S3 HEAD, in threads): it is not downloaded."""
    urls = [i for i, path in enumerate(paths) if "://" in path and is_url(path)]  # (substring
    # test first: 1M paths are common)
    local = np.ones(len(paths), bool)
    local[urls] = False
    ids = FileIds.empty(len(paths))
    ids.size[local], ids.mtime_ns[local] = _stat_local(
        list(compress(paths, local.tolist())) if urls else paths)
    if urls:
        with ThreadPoolExecutor(FETCH_CONCURRENCY) as pool:
            for i, found in zip(urls, pool.map(_url_identity, [paths[i] for i in urls])):
                if found is not None:
                    ids.size[i], ids.mtime_ns[i] = found
    return ids


# A rerun stats every input (~3 µs a file on a local disk, far more on a network file system):
# on Linux, past this many files, the stats are split over forked processes, one per core (at
# most 8), which inherit the paths rather than receive them.
STAT_PER_PROCESS = 100_000
_stat_paths: list[str] = []  # in a stat process: the paths it was forked with


def _stat_local(paths: list[str]) -> tuple[list[int], list[int]]:
    """(sizes, mtimes) of local files, in processes when there are many."""
    workers = min(len(paths) // STAT_PER_PROCESS, os.cpu_count() or 1, 8)
    if workers < 2 or not sys.platform.startswith("linux"):
        return _stat_each(paths)
    step = -(-len(paths) // workers)
    starts = range(0, len(paths), step)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_hold_paths, initargs=(paths,)) as pool:
            done = list(pool.map(_stat_range, starts, [k + step for k in starts]))
    except (OSError, RuntimeError, AssertionError):  # no processes here (a daemonic worker's,
        return _stat_each(paths)  # a broken pool, a sandbox): stat in this one
    return (list(chain.from_iterable(s for s, _ in done)),
            list(chain.from_iterable(m for _, m in done)))


def _hold_paths(paths: list[str]) -> None:
    global _stat_paths
    _stat_paths = paths


def _stat_range(start: int, stop: int) -> tuple[list[int], list[int]]:
    return _stat_each(_stat_paths[start:stop])


def _stat_each(paths: list[str]) -> tuple[list[int], list[int]]:
    sizes, mtimes = [MISSING] * len(paths), [0] * len(paths)
    stat = os.stat
    for i, path in enumerate(paths):  # (a tight loop: it runs for every input of a rerun)
        try:
            st = stat(path)
        except (OSError, ValueError):  # (ValueError: a NUL in the path)
            continue
        sizes[i], mtimes[i] = st.st_size, st.st_mtime_ns
    return sizes, mtimes


def _url_identity(url: str):
    from ..data.urls import url_stat

    return url_stat(url)  # None: gone, unreachable or unprovable: computed (and recorded) again


def file_identity(path: str) -> tuple[int, int, bytes]:
    """(size, mtime_ns, SHA-256) of one file, stat taken before reading so a file replaced
    meanwhile looks changed next time rather than current."""
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns, sha256_file(path)
    except (OSError, ValueError):  # missing, unreadable, not a regular file (a FIFO would
        return MISSING, 0, bytes(32)   # block), or a NUL in the path


def hash_files(paths: list[str], threads: int = 4) -> np.ndarray:
    """N×32 SHA-256 of the files' contents (zeros for unreadable files); hashlib frees the GIL.
    A URL is downloaded to be hashed."""
    def one(path):
        if is_url(path):
            from ..data.urls import Fetcher

            return Fetcher().fetch_one(path).sha256
        try:
            return sha256_file(path)
        except OSError:
            return bytes(32)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        digests = list(pool.map(one, paths, chunksize=64))
    return np.frombuffer(b"".join(digests), np.uint8).reshape(len(paths), 32).copy()


# -- what a file or shard holds --------------------------------------------------------------------

@dataclass
class Index:
    """The entries of a feature file or shard: its rows first, then its recorded failures."""

    file: Path
    paths: list[str]
    n_rows: int
    ids: FileIds
    reasons: list[str]  # one per failure
    group: str = "/"
    live: np.ndarray | None = None  # per entry, whether a plan may reuse it (None: all)


def _strings(dataset) -> list[str]:
    values = dataset[:]
    try:
        return list(map(bytes.decode, values))  # (one C-level pass: shards hold 1M paths)
    except TypeError:  # some already str
        return [v.decode() if isinstance(v, bytes) else v for v in values]


def _ids(group, n: int) -> FileIds:
    if "file_size" not in group:  # written before files had identities: nothing can be reused
        return FileIds(np.full(n, -2, np.int64), np.zeros(n, np.int64), np.zeros((n, 32), np.uint8))
    return FileIds(group["file_size"][:], group["file_mtime_ns"][:], group["file_sha256"][:])


def read_index(path: Where, group: str = "/") -> Index:
    with open_h5(path) as f:
        return index_of(f, path, group)


def index_of(f: h5py.File, path: Path, group: str = "/") -> Index:
    """The entries of ``group`` in the open file ``f`` (``path``: its name)."""
    g = f[group]
    paths, failed = _strings(g["paths"]), g["failed"]
    if not len(failed["paths"]):  # (most shards: three reads fewer)
        return Index(path, paths, len(paths), _ids(g, len(paths)), [], group)
    failed_paths = _strings(failed["paths"])
    return Index(path, paths + failed_paths, len(paths),
                 FileIds.concat([_ids(g, len(paths)), _ids(failed, len(failed_paths))]),
                 _strings(failed["reasons"]), group)


def _write_ids(group, ids: FileIds) -> None:
    group["file_size"] = ids.size.astype(np.int64)
    group["file_mtime_ns"] = ids.mtime_ns.astype(np.int64)
    group.create_dataset("file_sha256", data=ids.sha256.reshape(-1, 32).astype(np.uint8),
                         shape=(len(ids), 32), dtype=np.uint8)


def _write_failed(group, paths: list[str], reasons: list[str], ids: FileIds) -> None:
    failed = group.create_group("failed")
    failed.create_dataset("paths", data=paths, shape=(len(paths),), dtype=STR)
    failed.create_dataset("reasons", data=reasons, shape=(len(reasons),), dtype=STR)
    _write_ids(failed, ids)


# -- shards ----------------------------------------------------------------------------------------

def write_shard(parts: Where, name: str, *, paths: list[str], ids: FileIds, features: np.ndarray,
                input_sizes: np.ndarray, failed_paths: list[str], failed_reasons: list[str],
                failed_ids: FileIds, dtype: str, label_names: list[str] | None = None) -> Where:
    """Publish one shard atomically: it appears complete under its final name, or not at all.

    ``label_names``: each row's class name ("" for none), kept by a store's shards, whose rows
    outlive the run that labelled them (not stored when all are "").

    The HDF5 file is built in memory and written with plain file I/O, so a full disk is an
    ordinary, reportable error and never leaves a half-written HDF5 file behind; into a
    bucket, those bytes are uploaded as one object (vggfeat.cache.location).
    """
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.create_dataset("features", data=features.astype(dtype), dtype=dtype)
        f["input_sizes"] = input_sizes.astype(np.int32)
        f.create_dataset("paths", data=paths, shape=(len(paths),), dtype=STR)
        _write_ids(f, ids)
        _write_failed(f, failed_paths, failed_reasons, failed_ids)
        if label_names is not None and any(label_names):  # (none stored reads as all "")
            f.create_dataset("label_names", data=label_names, shape=(len(label_names),),
                             dtype=STR)
    final = parts / name
    try:
        location.publish(final, buffer.getvalue())
    except OSError as err:
        raise io_error(err, "publish results to", final) from err
    return final


def list_shards(parts: Where) -> list[Where]:
    """Published shards, oldest first; temporary files of interrupted writes are never listed."""
    found = listing(parts)
    names = [n for n in found if n.startswith("shard-") and n.endswith(".h5")]
    return [parts / n for n in sorted(names, key=lambda n: (found[n].mtime_ns, n))]


# -- writing a feature file ------------------------------------------------------------------------

@dataclass
class Rows:
    """Where each output row comes from: ``sources[source[i]]``, row ``row[i]``."""

    sources: list[Where]
    source: np.ndarray  # int, one per output row
    row: np.ndarray     # int64, one per output row
    groups: list[str] | None = None  # the group of each source ("/" when None)


# HDF5's own structures (superblock, object headers, B-trees, attributes) of a feature file:
# measured at 11–36 KiB for files of 0 to 10,000 rows (h5py 3.16; a file of 8 rows of 32
# floats is 15.5 KiB); rows cost their features, sizes, identity and path (160 bytes allowed
# for a path: above the real cost for paths up to about 100 bytes).
FILE_OVERHEAD = 48 << 10


def estimated_bytes(n_rows: int, dim: int, n_scales: int, dtype: str) -> int:
    return n_rows * (dim * np.dtype(dtype).itemsize + n_scales * 8 + 48 + 160) + FILE_OVERHEAD


def write_features(output: Path, rows: Rows, *, paths: list[str], ids: FileIds,
                   labels: np.ndarray | None, class_names: list[str] | None,
                   failed_paths: list[str], failed_reasons: list[str], failed_ids: FileIds,
                   attrs: dict, dim: int, n_scales: int, dtype: str, group: str = "/",
                   keep_others: bool = False) -> Path:
    """Write ``output`` atomically from rows of other feature files and shards.

    ``group``: where the rows go ("/": the root, the layout of an extract output; a name: a
    group of that layout).  ``keep_others``: the other settings the existing ``output`` holds
    (its root, its named groups) are copied into the new file unchanged; a named group of the
    very settings written is dropped, as these rows replace it.

    Rows are copied in blocks of about :data:`BLOCK_BYTES`, so memory does not grow with the
    number of rows; the per-row paths and identities are held in memory (~200 bytes a row).
    """
    # (a file that is not HDF5 has no settings to keep: only --overwrite gets to replace it)
    kept = (output.stat().st_size if keep_others and output.is_file() and h5py.is_hdf5(output)
            else 0)
    check_free_space(output.parent, estimated_bytes(len(paths), dim, n_scales, dtype) + kept,
                     f"write {output}")
    try:
        with atomic_path(output) as tmp, h5py.File(tmp, "w") as f:
            if kept:
                _copy_other_settings(output, f, group, attrs)
            target = f if group == "/" else f.create_group(group)
            write_group(target, rows, paths=paths, ids=ids, labels=labels,
                        class_names=class_names, failed_paths=failed_paths,
                        failed_reasons=failed_reasons, failed_ids=failed_ids, attrs=attrs,
                        dim=dim, n_scales=n_scales, dtype=dtype)
    except OSError as err:
        raise io_error(err, "write", output) from err
    return output


def _copy_other_settings(source: Path, dst: h5py.File, group: str, attrs: dict) -> None:
    """Copy into ``dst`` every setting of ``source`` but the one written at ``group``."""
    from .settings import setting_groups, settings_of

    written = settings_of(attrs)
    with h5py.File(source, "r") as src:
        others = setting_groups(src)
        for name in others:
            if name == group or (name != "/" and settings_of(src[name].attrs) == written):
                continue
            if name != "/":
                src.copy(src[name], dst, name=name)
                continue
            named = set(others) - {"/"}
            for member in src:  # the root's rows: every member but the named settings
                if member not in named:
                    src.copy(src[member], dst, name=member)
            dst.attrs.update(src.attrs)


def write_group(group, rows: Rows, *, paths, ids, labels, class_names, failed_paths,
                failed_reasons, failed_ids, attrs, dim, n_scales, dtype) -> None:
    n = len(paths)
    feats = group.create_dataset("features", shape=(n, dim), dtype=dtype,
                                 chunks=row_chunks(n, dim, dtype) if n else None)
    sizes = group.create_dataset("input_sizes", shape=(n, n_scales, 2), dtype=np.int32)
    copy_rows(rows, feats, sizes, block=max(1, BLOCK_BYTES // (dim * np.dtype(dtype).itemsize)))
    group.create_dataset("paths", data=paths, shape=(n,), dtype=STR)
    _write_ids(group, ids)
    if labels is not None:
        group["labels"] = np.asarray(labels, dtype=np.int64)
        group.create_dataset("class_names", data=class_names, dtype=STR)
    _write_failed(group, failed_paths, failed_reasons, failed_ids)
    for key, value in attrs.items():
        group.attrs[key] = value
    group.attrs["num_images"] = n
    group.attrs["num_failed"] = len(failed_paths)


def copy_rows(rows: Rows, feats, sizes, *, block: int) -> None:
    """Fill ``feats``/``sizes`` block by block, reading each source in runs of consecutive rows."""
    handles: OrderedDict[int, h5py.File] = OrderedDict()  # a few open sources at a time

    def source(k: int):
        if k in handles:
            handles.move_to_end(k)
        else:
            handles[k] = open_h5(rows.sources[k])
            if len(handles) > 32:
                handles.popitem(last=False)[1].close()
        g = handles[k][rows.groups[k] if rows.groups else "/"]
        return g["features"], g["input_sizes"]

    try:
        for lo in range(0, len(rows.row), block):
            hi = min(lo + block, len(rows.row))
            out = np.empty((hi - lo, feats.shape[1]), feats.dtype)
            out_sizes = np.empty((hi - lo, *sizes.shape[1:]), np.int32)
            for k in np.unique(rows.source[lo:hi]):
                at = np.flatnonzero(rows.source[lo:hi] == k)
                src_rows = rows.row[lo:hi][at]
                src_feats, src_sizes = source(int(k))
                breaks = np.flatnonzero((np.diff(src_rows) != 1) | (np.diff(at) != 1)) + 1
                for run in np.split(np.arange(len(at)), breaks):
                    a, b = src_rows[run[0]], src_rows[run[-1]] + 1
                    out[at[run[0]]:at[run[-1]] + 1] = src_feats[a:b]
                    out_sizes[at[run[0]]:at[run[-1]] + 1] = src_sizes[a:b]
            feats[lo:hi] = out
            sizes[lo:hi] = out_sizes
    finally:
        for f in handles.values():
            f.close()


# -- reading ---------------------------------------------------------------------------------------

def descriptor_groups(f: h5py.File) -> list[str]:
    """Groups holding rows: the root ("/") and any named groups of further settings."""
    from .settings import setting_groups

    return setting_groups(f)


def _group(f: h5py.File, path: Path, group: str | None):
    """The group to read: ``group`` (a name, or the root when it holds that setting), else
    the root, else the one named group."""
    from .settings import named_group

    if group is not None:
        found = "/" if group == "/" and "features" in f else named_group(f, group)
        if found is None:
            raise CacheError(f"{path} has no descriptor group {group!r}; it has "
                             f"{descriptor_groups(f)}")
        return f[found]
    groups = descriptor_groups(f)
    if "/" in groups or len(groups) == 1:
        return f[groups[0]]
    if not groups:
        raise CacheError(f"{path} is not a vggfeat feature file (no 'features'/'paths')")
    described = "; ".join(f"{g} (layer {f[g].attrs.get('layer')}, scales "
                          f"{_plain(f[g].attrs.get('scales'))})" for g in groups)
    raise CacheError(f"{path} holds descriptors of several settings: {described}; choose one "
                     "with group=NAME")


def open_features(path: Path) -> h5py.File:
    """``path`` opened for reading; a file that is not HDF5 is a CacheError naming it."""
    try:
        return h5py.File(path, "r")
    except OSError as err:
        what = (f"cannot be read ({err})" if not os.access(path, os.R_OK) or h5py.is_hdf5(path)
                else "is not an HDF5 feature file (another format, or a truncated file)")
        raise CacheError(f"{path} {what}; feature files are written by vggfeat extract or "
                         "vggfeat.sklearn.VGGFeatures") from err


def read_attrs(path: str | os.PathLike, *, group: str | None = None) -> dict:
    with open_features(Path(path)) as f:
        return {k: _plain(v) for k, v in _group(f, Path(path), group).attrs.items()}


def _plain(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _store_of(store: Where, group: str | None) -> Where:
    """The store (``store``, or one of its sub-stores) holding the setting named ``group``."""
    from .settings import named_store, sub_stores

    if group is None:
        return store
    found = named_store(store, group)
    if found is None:
        raise CacheError(f"feature store {store} has no setting {group!r}; it has its own and "
                         f"{[p.name for p in sub_stores(store)]}")
    return found


def load_features(path: str | os.PathLike, *, return_X_y: bool = False, lazy: bool = False,
                  group: str | None = None):
    """Read a vggfeat feature file, or a feature store (a folder of shards, docs/store.md:
    rows sorted by path).

    Returns a scikit-learn ``Bunch`` with ``data`` (N×D), ``target`` (N labels or None),
    ``target_names`` (class names or None), ``paths``, ``failed`` (list of (path, reason)),
    ``attrs`` (settings) and ``input_sizes``; or ``(X, y)`` with ``return_X_y=True``.

    With ``lazy=True``, ``data`` (or ``X``) is a :class:`~vggfeat.cache.rows.FeatureRows` view:
    index it to read rows (``data[1000:2000]``, ``data[[3, 1, 2]]``).  It opens the file only
    while reading and only the version that was loaded; ``data.close()`` (or the Bunch's
    ``file.close()``) closes it.  A file or store holds one descriptor setting, and any further
    ones a :class:`vggfeat.sklearn.VGGFeatures` cache added beside it: ``group`` (e.g. the
    estimator's ``cache_group_``) chooses one; by default the file's root, or the store's own.
    A store may be in a bucket (``"s3://bucket/feats"``, docs/store.md).
    """
    path = locate(path)
    if is_remote(path) or path.is_dir():
        from .sharded import is_store, load_store  # a store: a folder of shards (docs/store.md)

        if not is_store(path):
            raise CacheError(f"{path}: vggfeat reads feature stores from a bucket, not single "
                             "feature files; copy the file to a local disk, or extract into a "
                             f"store (-o {str(path)[:-len(path.suffix)]}) instead")
        return load_store(_store_of(path, group), return_X_y=return_X_y, lazy=lazy)
    if not path.is_file():
        parts = parts_dir(path)
        hint = (f"; {parts} holds an unfinished run: run the same extract command again to finish "
                "it") if parts.is_dir() else ""
        raise InputError(f"feature file {path} does not exist{hint}")
    with open_features(path) as f:
        g = _group(f, path, group)
        if lazy:
            feats = g["features"]
            data = FeatureRows([RowSource(path, feats.shape[0], stat_key(f), g.name)],
                               feats.shape[1], feats.dtype, max_open=1)
        else:
            data = g["features"][:]
        target = g["labels"][:] if "labels" in g else None
        if return_X_y:
            return data, target
        failed = list(zip(_strings(g["failed/paths"]), _strings(g["failed/reasons"])))
        from sklearn.utils import Bunch  # imported here: scikit-learn takes a second to load

        return Bunch(data=data, target=target,
                     target_names=_strings(g["class_names"]) if "class_names" in g else None,
                     paths=_strings(g["paths"]), failed=failed,
                     input_sizes=g["input_sizes"][:],
                     attrs={k: _plain(v) for k, v in g.attrs.items()},
                     file=data if lazy else None)
