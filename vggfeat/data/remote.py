"""Naming, expanding, identifying and opening inputs that may live anywhere fsspec reaches.

An input is a local path or a URL (``s3://``, ``gs://``, ``http(s)://``, ``file://``,
``memory://``, …).  Everything here goes through fsspec in its standard configuration:
credentials and endpoints come from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``,
``FSSPEC_S3_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, …), never from vggfeat options.
The back ends (s3fs, gcsfs, aiohttp) are optional; a URL that needs a missing one says which
extra installs it.

:class:`Sample` is one input image as the readers (tar shards, parquet files, URL lists) hand it
over: its stored key, its bytes (or why there are none), its label and what identifies it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import IO, Iterator

from ..errors import InputError, MissingDependencyError
from ..optional import require

__all__ = ["is_url", "expand", "ObjectId", "object_identity", "open_binary", "Sample",
           "filesystem", "join_relative"]

# scheme:// or fsspec's chained form (simplecache::s3://); a scheme has 2+ characters so that a
# Windows drive (C:\ or C://) stays a path.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+(::[A-Za-z][A-Za-z0-9+.-]+)*://")
# The package each fsspec protocol needs beyond fsspec, and the vggfeat extra that installs it.
_BACKENDS = {"s3": ("s3fs", "remote"), "s3a": ("s3fs", "remote"), "gs": ("gcsfs", "gcs"),
             "gcs": ("gcsfs", "gcs"), "http": ("aiohttp", "remote"),
             "https": ("aiohttp", "remote")}
_GLOB = re.compile(r"[*?]")
NO_DIGEST = bytes(32)  # the sha256 of a sample without data


def is_url(s: str) -> bool:
    """True for ``scheme://…`` strings (s3, gs, http(s), file, memory, …), False for local
    paths, Windows ones (``C:\\data``) included."""
    return bool(_URL.match(str(s)))


def _protocol(url: str) -> str:
    """The innermost protocol of a URL (``s3`` for ``simplecache::s3://b/k``), ``file`` for a
    path."""
    return url.split("://", 1)[0].rsplit("::", 1)[-1].lower() if is_url(url) else "file"


def filesystem(url: str, what: str | None = None):
    """``(fs, path)`` for a URL or local path: fsspec's ``url_to_fs`` after checking that the
    protocol's back end is installed (the message then names vggfeat's extra and ``what`` needs
    it: by default, reading inputs)."""
    import fsspec.core

    protocol = _protocol(url)
    if protocol in _BACKENDS:
        module, extra = _BACKENDS[protocol]
        require(module, extra, what or f"reading {protocol}:// inputs ({url})")
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:  # a protocol vggfeat has no extra for (hf://, abfs://, …)
        raise MissingDependencyError(f"reading {url} needs a package that is not installed: "
                                     f"{err}") from err
    except ValueError as err:
        raise InputError(f"{url}: unknown protocol {protocol!r} ({err}); give a local path or "
                         f"a URL fsspec reads (s3://, gs://, https://, file://)") from err


def _full_name(fs, path: str, like: str) -> str:
    """A path that fsspec's glob returned, written back in the form the user gave: a URL with
    its protocol for a URL pattern, a plain path for a local one."""
    return fs.unstrip_protocol(path) if is_url(like) else path


def _matches(pattern: str) -> list[str]:
    """The names one brace-free pattern stands for: its sorted glob matches if it has ``*`` or
    ``?``; else the name itself (a local one made absolute), whether or not it exists: a
    missing shard of a range is an error when it is read, never silently left out (its rows
    would be dropped as if the shard had been removed)."""
    protocol = _protocol(pattern)
    if _GLOB.search(pattern) and protocol not in ("http", "https"):  # http: ? starts a query
        fs, path = filesystem(pattern)
        return sorted(_full_name(fs, p, pattern) for p in fs.glob(path) if not fs.isdir(p))
    if protocol != "file":
        return [pattern]
    fs, path = filesystem(pattern)  # absolute, as glob's matches are: repeats compare equal
    return [_full_name(fs, path, pattern)]


def expand(pattern: str) -> list[str]:
    """The inputs a shard pattern names, in order and without repeats.

    Braces are expanded first as WebDataset does (``train-{000000..000999}.tar``, ``{a,b}``, with
    the ``braceexpand`` package), then each result with ``*``/``?`` is globbed through fsspec
    (local paths and URLs alike; matches sorted; folders left out).  HTTP(S) URLs are never
    globbed (``?`` starts their query).  A name without wildcards is kept as it is (a local one
    made absolute), unchecked: a missing one fails when it is read, naming itself, rather than
    being left out.  Raises :class:`InputError` naming the pattern when nothing matches (no
    local name exists).
    """
    from braceexpand import braceexpand

    try:
        names = list(braceexpand(pattern))
    except Exception as err:  # braceexpand raises bare exceptions on unbalanced braces
        raise InputError(f"{pattern}: not a valid shard pattern ({err})") from err
    found: dict[str, None] = {}
    for name in names:
        found.update(dict.fromkeys(_matches(name)))
    if not found or all(_protocol(n) == "file" and not os.path.exists(filesystem(n)[1])
                        for n in found):
        raise InputError(f"{pattern}: matches nothing; check the path (braces like "
                         f"train-{{000000..000099}}.tar and * ? are expanded)")
    return list(found)


@dataclass(frozen=True)
class ObjectId:
    """What identifies a stored object's content without reading it: its size, its
    modification time (ns since the epoch, -1 when the store gives none) and its ETag (``""``
    when none)."""

    size: int
    mtime_ns: int
    etag: str

    def stamp(self) -> int | None:
        """What a file's mtime is to a rerun: the modification time, else (a server that gives
        only an ETag) a number derived from the ETag, else None: nothing proves the object
        unchanged, so it is read again."""
        if self.mtime_ns >= 0:
            return self.mtime_ns
        if self.etag:
            return -2 - int.from_bytes(hashlib.sha256(self.etag.encode()).digest()[:7], "big")
        return None


def _to_ns(value) -> int:
    """Nanoseconds since the epoch from what fsspec back ends report as a modification time: a
    datetime (s3), an HTTP date or ISO string (http, gcs), or seconds as a number (local)."""
    if value is None or value == "":
        return -1
    if isinstance(value, (int, float)):
        return int(value * 1e9)
    if isinstance(value, str):
        try:
            value = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            try:
                value = _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                return -1
    if value.tzinfo is None:  # HTTP dates and S3 times are UTC
        value = value.replace(tzinfo=_dt.timezone.utc)
    return int(value.timestamp()) * 1_000_000_000 + value.microsecond * 1000


def identity_of(info: dict) -> ObjectId:
    """An :class:`ObjectId` from an fsspec ``info()`` dict, whichever back end wrote it."""
    size = info.get("size")
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or ""
    for key in ("LastModified", "Last-Modified", "last_modified", "updated", "mtime"):
        if info.get(key) not in (None, ""):
            mtime_ns = _to_ns(info[key])
            break
    else:
        mtime_ns = -1
    return ObjectId(size=int(size) if size is not None else -1, mtime_ns=mtime_ns,
                    etag=str(etag))


def object_identity(url: str) -> ObjectId:
    """Size, modification time and ETag of the object at ``url`` (or a local file), from its
    metadata only (an S3 HEAD, an HTTP HEAD, a stat): the object is never downloaded.

    Raises :class:`InputError` naming ``url`` when it does not exist or cannot be read.
    """
    if _protocol(url) == "file":  # a stat keeps the mtime's nanoseconds, which fsspec rounds
        try:
            st = os.stat(filesystem(url)[1])
        except OSError as err:
            raise InputError(f"{url}: {_os_reason(err)}") from err
        return ObjectId(size=st.st_size, mtime_ns=st.st_mtime_ns, etag="")
    fs, path = filesystem(url)
    try:
        info = fs.info(path)
    except OSError as err:
        raise InputError(f"{url}: {_os_reason(err)}") from err
    if info.get("type") == "directory":
        raise InputError(f"{url}: is a folder, not a file; name its files (a glob like "
                         f"{url.rstrip('/')}/*.tar works)")
    return identity_of(info)


def _os_reason(err: OSError) -> str:
    """A user-facing reason for a failed open or stat."""
    if isinstance(err, FileNotFoundError):
        return "not found (check the path or URL)"
    if isinstance(err, PermissionError):
        return f"access denied ({err}); check the credentials in the environment"
    if isinstance(err, IsADirectoryError):
        return "is a folder, not a file"
    return f"cannot be read ({err})"


@contextmanager
def open_binary(url: str) -> Iterator[IO[bytes]]:
    """A readable binary file for a URL or local path, closed on leaving the ``with``.

    Raises :class:`InputError` naming ``url`` when it cannot be opened (missing, a folder,
    access denied); errors while reading come from the back end.
    """
    fs, path = filesystem(url)
    try:
        f = fs.open(path, "rb")
    except OSError as err:
        raise InputError(f"{url}: {_os_reason(err)}") from err
    with f:
        yield f


def join_relative(base: str, name: str) -> str:
    """``name`` read relative to the folder of ``base`` (a file's URL or path), unless it is a
    URL or an absolute path already."""
    if is_url(name) or os.path.isabs(name):
        return name
    if is_url(base):
        return base.rsplit("/", 1)[0] + "/" + name
    return os.path.join(os.path.dirname(os.path.abspath(base)), name)


@dataclass
class Sample:
    """One input image as a reader hands it over.

    ``key`` is what the output stores as the row's path (``<tar>#<sample key>``,
    ``<parquet>#<row>``, or the URL).  ``data`` is the image file's bytes, or None with
    ``reason`` saying why (HTTP 404, timed out, no image member, …); decoding is the caller's.
    ``size`` is ``len(data)`` (-1 without data), ``mtime_ns`` the member's or object's
    modification time (-1 when unknown) and ``sha256`` the digest of ``data`` (32 zero bytes
    without data).
    """

    key: str
    data: bytes | None
    label: str | None
    reason: str | None
    size: int
    mtime_ns: int
    sha256: bytes

    @classmethod
    def ok(cls, key: str, data: bytes, label: str | None = None, mtime_ns: int = -1) -> Sample:
        return cls(key=key, data=data, label=label, reason=None, size=len(data),
                   mtime_ns=mtime_ns, sha256=hashlib.sha256(data).digest())

    @classmethod
    def failed(cls, key: str, reason: str, label: str | None = None,
               mtime_ns: int = -1) -> Sample:
        return cls(key=key, data=None, label=label, reason=reason, size=-1, mtime_ns=mtime_ns,
                   sha256=NO_DIGEST)
