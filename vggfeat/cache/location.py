"""Where a feature store lives: a local folder, or a folder of a bucket reached through fsspec.

A store needs few operations of its storage: read a small file (``settings.json``, an index
entry), publish a file whole (a shard, an entry), publish ``settings.json`` once, list a folder
with sizes and times, delete a file (compaction), and open a shard with h5py.  Each function here
takes a :class:`~pathlib.Path` or a :class:`Url` and does that operation, so the store has one
code path for both.

* A local store is a ``Path`` and keeps every protection of :mod:`vggfeat.fileio`: a file is
  written under a temporary name created new (never through a link), flushed and renamed; the
  settings file is published by a link, which never replaces one.
* A store in a bucket is a :class:`Url`.  h5py cannot write through fsspec and a rename there is
  a copy, but a whole-object upload (a PUT, or a multipart upload completed in one call) makes an
  object appear whole or not at all: shards are built in memory already, so their bytes are
  uploaded as one object.  ``settings.json`` is uploaded with S3's ``If-None-Match: *`` where
  the back end has it (s3fs), so it is never replaced; elsewhere it is checked, then put, and
  two first writers racing in between could both put theirs (docs/store.md).

Credentials and endpoints come from fsspec's standard configuration (``AWS_ENDPOINT_URL``,
``FSSPEC_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, …), as for inputs (vggfeat.data.remote).
"""

from __future__ import annotations

import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import h5py

from ..fileio import create_new, fsync_path, write_bytes_atomic

# Reading a shard through fsspec: HDF5 reads small pieces at scattered offsets (superblock,
# object headers, the heap of path strings) and then runs of rows, so whole blocks are fetched
# and a few of them kept, per open file.
READ_BLOCK = 1 << 20
READ_BLOCKS = 8


@dataclass(frozen=True, order=True)
class Url:
    """A file or folder in a bucket (``s3://bucket/feats/shards/x.h5``), joined with ``/`` like a
    Path.  Deliberately not ``os.PathLike``: no local file call can take it by mistake."""

    url: str

    def __truediv__(self, name: str) -> Url:
        return Url(f"{self.url.rstrip('/')}/{name}")

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Url:
        return Url(self.url.rstrip("/").rsplit("/", 1)[0])

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    def __str__(self) -> str:
        return self.url


Where = Path | Url


def locate(name: str | os.PathLike | Url) -> Where:
    """A :class:`Url` for a remote URL (``s3://``, ``gs://``, ``memory://`` …), else a Path
    (a ``file://`` URL included: a local folder keeps the local protections)."""
    if isinstance(name, (Path, Url)):
        return name
    from ..data.remote import _protocol, is_url

    text = os.fspath(name)
    if not is_url(text):
        return Path(text)
    if _protocol(text) == "file":
        return Path(_fs(Url(text))[1])
    return Url(text.rstrip("/"))


def is_remote(where) -> bool:
    return isinstance(where, Url)


def _fs(url: Url):
    from ..data.remote import filesystem

    return filesystem(url.url, f"a feature store at {url}")


def _fresh(url: Url):
    """``_fs(url)`` with what fsspec remembers of ``url`` forgotten: other writers publish
    beside this one, so a listing or a size is read now, never from an earlier listing."""
    fs, path = _fs(url)
    fs.invalidate_cache(path)
    return fs, path


@dataclass(frozen=True)
class Listed:
    """One name of a folder: its size, modification time (ns) and kind (file, folder, other:
    a local link or device, which a store never follows)."""

    size: int
    mtime_ns: int
    kind: str


def listing(folder: Where) -> dict[str, Listed]:
    """The names in ``folder`` (empty when there is none), read now: never a cached listing,
    since other writers publish beside this one."""
    if not is_remote(folder):
        return _local_listing(folder)
    from ..data.remote import identity_of

    fs, path = _fresh(folder)
    try:
        found = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {PurePosixPath(i["name"].rstrip("/")).name: Listed(
        int(i.get("size") or 0), identity_of(i).mtime_ns,
        "folder" if i.get("type") == "directory" else "file") for i in found
        if i["name"].rstrip("/") != path.rstrip("/")}


def _local_listing(folder: Path) -> dict[str, Listed]:
    names = {}
    try:
        with os.scandir(folder) as found:
            for entry in found:
                try:
                    names[entry.name] = _listed(entry.stat(follow_symlinks=False))
                except FileNotFoundError:  # another writer's temporary, renamed meanwhile
                    continue
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return names


def _listed(st: os.stat_result) -> Listed:
    kind = ("folder" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode)
            else "other")
    return Listed(st.st_size, st.st_mtime_ns, kind)


def is_folder(where: Where) -> bool:
    """A local folder; a prefix of a bucket holding at least one object."""
    return bool(listing(where)) if is_remote(where) else where.is_dir()


def exists(where: Where) -> bool:
    if not is_remote(where):
        return where.exists() or where.is_symlink()
    fs, path = _fresh(where)
    return fs.exists(path)


def read_bytes(where: Where) -> bytes:
    """A small file's content; FileNotFoundError when it is absent."""
    if not is_remote(where):
        return where.read_bytes()
    fs, path = _fs(where)
    return fs.cat_file(path)


def size(where: Where) -> int:
    if not is_remote(where):
        return where.stat().st_size
    fs, path = _fresh(where)
    return int(fs.info(path)["size"])


def publish(where: Where, data: bytes) -> None:
    """Make ``where`` appear holding ``data``, whole or not at all: locally through a temporary
    file and a rename (vggfeat.fileio); in a bucket as one uploaded object."""
    if not is_remote(where):
        write_bytes_atomic(where, data)
        return
    fs, path = _fs(where)
    fs.pipe_file(path, data)


def publish_once(where: Where, data: bytes) -> None:
    """Publish ``data`` at ``where`` unless a file is there already (then nothing is written:
    the caller reads what the first writer published)."""
    if not is_remote(where):
        _link_once(where, data)
        return
    fs, path = _fs(where)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "s3" in protocols:
        try:  # S3's conditional PUT (If-None-Match: *): the first writer wins, atomically
            fs.pipe_file(path, data, mode="create")
            return
        except FileExistsError:
            return
        except Exception:  # a server that refuses the condition: check, then put (below)
            pass  # (a real fault, such as denied access, fails the put below too)
    fs.invalidate_cache(path)
    if not fs.exists(path):  # (no conditional PUT: two first writers may both put theirs)
        fs.pipe_file(path, data)


def _link_once(path: Path, data: bytes) -> None:
    """A link never replaces a file: the first writer's settings stay."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(create_new(tmp), "wb") as f:
            f.write(data)
        fsync_path(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def delete(where: Where) -> None:
    """Remove a plain file (a link is never followed: locally, only plain files go)."""
    if not is_remote(where):
        if where.is_file() and not where.is_symlink():
            where.unlink(missing_ok=True)
        return
    fs, path = _fs(where)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


class _ObjectFile(h5py.File):
    """An HDF5 file read from an object through fsspec; closing it closes the object too."""

    def __init__(self, url: Url, handle) -> None:
        super().__init__(handle, "r")
        self.url, self.handle = url, handle

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.handle.close()


def open_h5(where: Where) -> h5py.File:
    """``where`` opened for reading with h5py (a remote one through ranged reads)."""
    if not is_remote(where):
        return h5py.File(where, "r")
    fs, path = _fs(where)
    handle = fs.open(path, "rb", cache_type="blockcache", block_size=READ_BLOCK,
                     cache_options={"maxblocks": READ_BLOCKS})
    try:
        return _ObjectFile(where, handle)
    except BaseException:
        handle.close()
        raise


def version(where: Where | h5py.File) -> tuple:
    """What identifies one version of a file (of an open one: the version it has open): the
    device, inode, size and mtime of a local file; ``"object"``, the URL, size and ETag of an
    object (the size is third in both: callers read it there).  An object opened here is
    also read with ``If-Match`` its ETag (s3fs), so a replaced one fails the read."""
    if isinstance(where, _ObjectFile):
        return _object_key(where.url, where.handle.details)
    if isinstance(where, h5py.File):
        st = os.fstat(where.id.get_vfd_handle())
    elif is_remote(where):
        fs, path = _fresh(where)
        return _object_key(where, fs.info(path))
    else:
        st = os.stat(where)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _object_key(url: Url, info: dict) -> tuple:
    # (a listing's LastModified has milliseconds, a HEAD's seconds: the time is left out)
    from ..data.remote import identity_of

    found = identity_of(info)
    return "object", str(url), found.size, found.etag


def check_reachable(url: Url) -> None:
    """Refuse, before any work, a store in a bucket that does not exist or cannot be seen."""
    from ..errors import CacheError

    fs, path = _fs(url)
    bucket = path.split("/", 1)[0]
    try:
        found = fs.exists(bucket)
    except OSError as err:
        found, why = False, f" ({err})"
    else:
        why = ""
    if not found:
        raise CacheError(f"cannot write the feature store {url}: its bucket {bucket!r} does not "
                         f"exist or these credentials cannot reach it{why}; create the bucket, "
                         "or check the credentials and endpoint in the environment "
                         "(AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL / FSSPEC_S3_ENDPOINT_URL)")


def refuse_remote_file(where: Where, what: str = "output") -> None:
    """A single ``.h5`` file is rewritten in place by every update, which a bucket cannot do
    (h5py writes through a local file, and an object is replaced only whole)."""
    if is_remote(where):
        from ..errors import CacheError

        store = where.url[:-len(where.suffix)] if where.suffix else where.url
        raise CacheError(f"{what} {where} is one .h5 file in a bucket, which vggfeat cannot "
                         "update in place: write a feature store there instead (a name without "
                         f"suffix, e.g. -o {store}), or write the file on a local disk and copy "
                         "it to the bucket when done")
