"""Reading lists of image URLs and downloading them, reliably, as Samples.

:func:`read_url_list` reads a ``.txt``, ``.csv`` or ``.parquet`` list of URLs (and labels).
:class:`Fetcher` downloads URLs with bounded concurrency and yields one
:class:`~vggfeat.data.remote.Sample` per URL, in the input's order: HTTP(S) through a pooled
``requests`` session per thread, anything else (``s3://``, ``gs://``, ``file://``, local paths)
through fsspec.  Transient failures (5xx, 429, 408, connection errors, timeouts, truncated
bodies) are retried with exponential backoff and jitter; the rest fail at once.  A failed
download is a Sample without data whose reason says why, never an exception.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import random
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http import HTTPStatus
from typing import Callable, Iterable, Iterator, TypeVar
from urllib.parse import urlsplit

from ..choices import (FETCH_BACKOFF, FETCH_CONCURRENCY, FETCH_MAX_BYTES, FETCH_MAX_REDIRECTS,
                       FETCH_RETRIES, FETCH_TIMEOUT)
from ..errors import InputError, MissingDependencyError
from ..optional import require
from .remote import ObjectId, Sample, _os_reason, _to_ns, filesystem, identity_of, is_url
from .remote import object_identity, open_binary

__all__ = ["read_url_list", "Fetcher"]

T = TypeVar("T")
LIST_SUFFIXES = (".txt", ".lst", ".csv", ".parquet")
_CHUNK = 1 << 16
_RETRY_AFTER_CAP = 60.0  # seconds: a server's Retry-After is obeyed up to this


# ---- URL lists ---------------------------------------------------------------------------------

def read_url_list(path_or_url: str) -> list[tuple[str, str | None]]:
    """``(url, label or None)`` for each entry of a URL list, in its order.

    ``.txt`` (or ``.lst``): one URL per line; blank lines and ``#`` comments are skipped.
    ``.csv``: a header row with a ``url`` column and an optional ``label`` column.
    ``.parquet``: a ``url`` column and an optional ``label`` column, read one row group at a
    time.  The list itself may be a local path or any fsspec URL.  Raises
    :class:`InputError` naming the file for an unknown suffix or a missing ``url`` column.
    """
    where = urlsplit(path_or_url).path if is_url(path_or_url) else path_or_url
    suffix = os.path.splitext(where)[1].lower()
    if suffix not in LIST_SUFFIXES:
        raise InputError(f"{path_or_url}: a URL list must be .txt (one URL per line), .csv or "
                         f".parquet (a 'url' column, optionally 'label'), not "
                         f"{suffix or 'a file without a suffix'!r}")
    if suffix == ".parquet":
        return _parquet_list(path_or_url)
    with open_binary(path_or_url) as f:
        text = f.read().decode("utf-8-sig")
    return _csv_list(path_or_url, text) if suffix == ".csv" else _text_list(text)


def _text_list(text: str) -> list[tuple[str, str | None]]:
    lines = (line.strip() for line in text.splitlines())
    return [(line, None) for line in lines if line and not line.startswith("#")]


def _csv_list(name: str, text: str) -> list[tuple[str, str | None]]:
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    if "url" not in columns:
        raise InputError(_no_url_column(name, columns))
    entries = []
    for row in reader:
        url = (row.get("url") or "").strip()
        if url:
            entries.append((url, (row.get("label") or "").strip() or None))
    return entries


def _parquet_list(name: str) -> list[tuple[str, str | None]]:
    pq = require("pyarrow.parquet", "parquet", "reading a .parquet URL list")
    entries: list[tuple[str, str | None]] = []
    with open_binary(name) as f:
        pf = pq.ParquetFile(f)
        columns = pf.schema_arrow.names
        if "url" not in columns:
            raise InputError(_no_url_column(name, columns))
        wanted = ["url"] + (["label"] if "label" in columns else [])
        for group in range(pf.num_row_groups):  # one row group in memory at a time
            table = pf.read_row_group(group, columns=wanted)
            urls = table.column("url").to_pylist()
            labels = (table.column("label").to_pylist() if "label" in wanted
                      else [None] * len(urls))
            entries += [(str(u).strip(), None if lab is None else str(lab))
                        for u, lab in zip(urls, labels) if u]
    return entries


def _no_url_column(name: str, columns: list[str]) -> str:
    return (f"{name}: no 'url' column; its columns are {', '.join(columns) or '(none)'}. "
            f"A URL list needs a 'url' column (and optionally 'label')")


# ---- downloading -------------------------------------------------------------------------------

class _Failure(Exception):
    """One try that did not work: ``reason`` for the Sample, whether trying again may help,
    and the wait a server asked for (Retry-After)."""

    def __init__(self, reason: str, retry: bool, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry, self.retry_after = reason, retry, retry_after


def _status_failure(code: int, phrase: str, retry_after: str | None) -> _Failure:
    """The failure an HTTP error status means: 5xx, 408 and 429 are worth another try."""
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        pass  # a non-standard code: keep the server's own words
    wait = float(retry_after) if retry_after and retry_after.strip().isdigit() else None
    return _Failure(f"HTTP {code} {phrase}".strip(), code >= 500 or code in (408, 429), wait)


def _size_text(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n} bytes"


class Fetcher:
    """Downloads URLs into Samples with bounded concurrency, retries and a size cap.

    ``timeout``: seconds a connection or a read may stall (and the HEAD's limit).
    ``retries``: tries after the first for a transient failure (5xx, 408, 429, connection
    errors, timeouts, truncated bodies), waiting ``backoff`` × 2^k seconds plus jitter between
    them (longer when the server sends Retry-After, up to a minute).  ``max_bytes``: bodies
    larger than this fail ("larger than … (size cap)") without being read to the end.
    ``concurrency``: downloads in flight.  ``deadline``: seconds one try may take in all
    (default 30 × ``timeout``), so a server that trickles bytes cannot hold a worker for ever.
    Redirects are followed, at most ``max_redirects`` in a row.

    Memory: at most 2 × ``concurrency`` bodies wait to be yielded at any time.  Thread-safe:
    one pooled ``requests`` session per worker thread.
    """

    def __init__(self, timeout: float = FETCH_TIMEOUT, retries: int = FETCH_RETRIES,
                 backoff: float = FETCH_BACKOFF, max_bytes: int = FETCH_MAX_BYTES,
                 concurrency: int = FETCH_CONCURRENCY, *, deadline: float | None = None,
                 max_redirects: int = FETCH_MAX_REDIRECTS):
        if concurrency < 1 or retries < 0 or timeout <= 0 or max_bytes < 1:
            raise InputError(f"fetch settings out of range: concurrency {concurrency} (≥ 1), "
                             f"retries {retries} (≥ 0), timeout {timeout} (> 0), max_bytes "
                             f"{max_bytes} (≥ 1)")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.max_bytes, self.concurrency = int(max_bytes), int(concurrency)
        self.deadline = float(deadline) if deadline is not None else 30 * self.timeout
        self.max_redirects = int(max_redirects)
        self._local = threading.local()

    # -- the public calls --

    def fetch(self, urls: Iterable[str]) -> Iterator[Sample]:
        """One Sample per URL, in the input's order (key = the URL), downloaded ``concurrency``
        at a time.  Stopping the iteration early cancels the downloads not yet started."""
        yield from self._ordered(self.fetch_one, urls)

    def head(self, urls: Iterable[str]) -> list[ObjectId | None]:
        """What identifies each URL's content without downloading it (an HTTP HEAD, an S3
        HEAD, a stat), with the same retries; None where that fails or the server gives none
        of ETag, Last-Modified and size."""
        return list(self._ordered(self.head_one, urls))

    def fetch_one(self, url: str) -> Sample:
        """Download one URL (with retries) into a Sample."""
        if _is_http(url):
            self._http()  # a missing requests is the run's problem, not this URL's
        read = self._get_http if _is_http(url) else self._get_fsspec
        result, reason = self._retrying(lambda: read(url))
        if result is None:
            return Sample.failed(url, reason)
        data, mtime_ns = result
        return Sample.ok(url, data, mtime_ns=mtime_ns)

    def head_one(self, url: str) -> ObjectId | None:
        """One URL's :class:`ObjectId` (with retries), or None."""
        if _is_http(url):
            self._http()
        ask = self._head_http if _is_http(url) else self._head_fsspec
        result, _ = self._retrying(lambda: ask(url))
        if result is None or (result.size < 0 and result.mtime_ns < 0 and not result.etag):
            return None
        return result

    # -- order and concurrency --

    def _ordered(self, work: Callable[[str], T], urls: Iterable[str]) -> Iterator[T]:
        """``work(url)`` for each URL in a thread pool, yielded in the input's order, with at
        most 2 × ``concurrency`` results submitted and not yet yielded."""
        pending = iter(urls)
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="vggfeat-fetch")
        window = deque(pool.submit(work, u)
                       for u in itertools.islice(pending, 2 * self.concurrency))
        try:
            while window:
                result = window.popleft().result()
                for url in itertools.islice(pending, 1):
                    window.append(pool.submit(work, url))
                yield result
        finally:
            # an early stop: queued downloads are dropped, running ones end on their own
            pool.shutdown(wait=False, cancel_futures=True)

    # -- retries --

    def _retrying(self, attempt: Callable[[], T]) -> tuple[T | None, str | None]:
        """``(result, None)`` from the first try that works, or ``(None, reason)`` once a try
        fails for good or the retries are spent; the reason counts the tries when there were
        several."""
        for tries in itertools.count(1):
            try:
                return attempt(), None
            except _Failure as failure:
                if not failure.retry or tries > self.retries:
                    return None, failure.reason + (f" ({tries} tries)" if tries > 1 else "")
                time.sleep(self._wait(tries, failure.retry_after))
        raise AssertionError("unreachable")

    def _wait(self, tries: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter (so that many workers do not retry in step), or
        the server's Retry-After when longer, up to a minute."""
        wait = self.backoff * 2 ** (tries - 1) + random.uniform(0, self.backoff)
        return max(wait, min(retry_after, _RETRY_AFTER_CAP)) if retry_after else wait

    # -- HTTP(S) --

    def _http(self):
        return require("requests", "remote", "downloading http(s) URLs")

    def _session(self):
        """This thread's pooled session: one per thread, since a shared ``requests.Session``
        is not guaranteed thread-safe."""
        session = getattr(self._local, "session", None)
        if session is None:
            requests = self._http()
            session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=4)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.max_redirects = self.max_redirects
            # identity: the size cap then counts the bytes that travel, and no server can send
            # a small gzip bomb
            session.headers.update({"Accept-Encoding": "identity", "User-Agent": "vggfeat"})
            self._local.session = session
        return session

    def _get_http(self, url: str) -> tuple[bytes, int]:
        """One GET: the body and its Last-Modified (ns, -1 when none), or a _Failure."""
        with self._http_errors():
            with self._session().get(url, stream=True, timeout=self.timeout) as response:
                if response.status_code >= 300:
                    raise _status_failure(response.status_code, response.reason,
                                          response.headers.get("Retry-After"))
                data = self._read_body(response)
                return data, _to_ns(response.headers.get("Last-Modified"))

    def _read_body(self, response) -> bytes:
        """The body, refusing one over ``max_bytes`` and checking it against Content-Length."""
        requests = self._http()
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        if expected is not None and expected > self.max_bytes:
            raise _Failure(f"larger than {_size_text(self.max_bytes)} (size cap; the server "
                           f"says {_size_text(expected)})", retry=False)
        started, chunks, got = time.monotonic(), [], 0
        try:
            for chunk in response.iter_content(_CHUNK):
                got += len(chunk)
                if got > self.max_bytes:
                    raise _Failure(f"larger than {_size_text(self.max_bytes)} (size cap)",
                                   retry=False)
                if time.monotonic() - started > self.deadline:
                    raise _Failure(f"timed out after {self.deadline:g} s (the whole download)",
                                   retry=True)
                chunks.append(chunk)
        except requests.exceptions.ChunkedEncodingError as err:  # urllib3 saw a short body
            got = max(got, _partial(err))  # the bytes of the last, short read are dropped
            if expected is None:
                raise _Failure(f"truncated: the connection broke after {got} bytes ({err})",
                               retry=True) from err
        if expected is not None and got < expected:
            raise _Failure(f"truncated: got {got} of {expected} bytes", retry=True)
        return b"".join(chunks)

    def _head_http(self, url: str) -> ObjectId:
        with self._http_errors():
            response = self._session().head(url, timeout=self.timeout, allow_redirects=True)
            with response:
                if response.status_code >= 300:
                    raise _status_failure(response.status_code, response.reason,
                                          response.headers.get("Retry-After"))
                headers = response.headers
                length = headers.get("Content-Length")
                encoded = headers.get("Content-Encoding", "identity") not in ("identity", "")
                size = int(length) if length and length.isdigit() and not encoded else -1
                return ObjectId(size=size, mtime_ns=_to_ns(headers.get("Last-Modified")),
                                etag=headers.get("ETag", ""))

    def _http_errors(self):
        return _http_errors(self._http(), self.timeout, self.max_redirects)

    # -- everything else fsspec reads --

    def _get_fsspec(self, url: str) -> tuple[bytes, int]:
        """One read through fsspec (s3://, gs://, file://, a local path)."""
        try:
            fs, path = filesystem(url)
        except MissingDependencyError:
            raise  # the run cannot read such URLs at all: not one sample's failure
        except InputError as err:  # an unknown protocol
            raise _Failure(str(err), retry=False) from err
        with _fsspec_errors():
            with fs.open(path, "rb") as f:
                data = f.read(self.max_bytes + 1)
                details = getattr(f, "details", None)  # what the open already learnt
            if len(data) > self.max_bytes:
                raise _Failure(f"larger than {_size_text(self.max_bytes)} (size cap)",
                               retry=False)
            identity = identity_of(details) if details else _local_identity(url, fs, path)
            return data, identity.mtime_ns

    def _head_fsspec(self, url: str) -> ObjectId:
        try:
            return object_identity(url)
        except InputError as err:
            cause = err.__cause__
            retry = isinstance(cause, OSError) and not isinstance(
                cause, (FileNotFoundError, PermissionError, IsADirectoryError))
            raise _Failure(str(err), retry=retry) from err


def _local_identity(url: str, fs, path: str) -> ObjectId:
    """The identity of a file fsspec opened without recording its details (local files)."""
    return object_identity(url) if _is_local(fs) else identity_of(fs.info(path))


def _is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _is_http(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://"))


@contextmanager
def _fsspec_errors():
    """Turns what an fsspec read raises into _Failures: a missing object, a folder or denied
    access fail at once; anything else is retried.  The back ends' own network errors
    (botocore's, aiohttp's) are not all OSErrors, and the block this guards is only the
    open and the read, so any exception there is the store's."""
    try:
        yield
    except (_Failure, MissingDependencyError):
        raise
    except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
        raise _Failure(_os_reason(err), retry=False) from err
    except (OSError, TimeoutError) as err:
        raise _Failure(_os_reason(err), retry=True) from err
    except Exception as err:
        raise _Failure(f"read error ({type(err).__name__}: {err})", retry=True) from err


@contextmanager
def _http_errors(requests, timeout: float, max_redirects: int):
    """Turns ``requests``' exceptions into _Failures: timeouts and connection errors are
    retried, too many redirects and invalid URLs are not."""
    exc = requests.exceptions
    try:
        yield
    except _Failure:
        raise
    except exc.TooManyRedirects as err:
        raise _Failure(f"more than {max_redirects} redirects", retry=False) from err
    except (exc.InvalidURL, exc.MissingSchema, exc.InvalidSchema) as err:
        raise _Failure(f"not a valid URL ({err})", retry=False) from err
    except exc.RequestException as err:
        if isinstance(err, exc.Timeout) or _is_read_timeout(err):
            raise _Failure(f"timed out after {timeout:g} s", retry=True) from err
        raise _Failure(f"connection error: {_short(err)}", retry=True) from err


def _partial(err: BaseException) -> int:
    """The bytes received before a body broke off, as urllib3's IncompleteRead counts them
    (0 when the error chain does not say)."""
    seen = [err]
    while seen:
        e = seen.pop()
        if isinstance(getattr(e, "partial", None), int):
            return e.partial
        seen += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
    return 0


def _is_read_timeout(err: BaseException) -> bool:
    """True for the read timeout that ``requests`` reports, mid-body, as a ConnectionError."""
    import urllib3.exceptions

    cause = err.args[0] if err.args else None
    return isinstance(cause, urllib3.exceptions.ReadTimeoutError)


def _short(err: BaseException) -> str:
    """The innermost reason of a ``requests``/urllib3 error chain (``[Errno 111] Connection
    refused`` rather than three wrappers' worth of repr)."""
    while err.args and isinstance(err.args[0], BaseException):
        err = err.args[0]
    reason = getattr(err, "reason", None)
    return str(reason if isinstance(reason, BaseException) else err)


def url_identity(url: str, fetcher: Fetcher | None = None) -> ObjectId | None:
    """Size, time and ETag of the object at ``url`` from its metadata, or None when it cannot
    be had (missing, unreachable): an HTTP(S) HEAD under the fetcher's timeout and retries (so a
    server that never answers cannot hang a run), other URLs through fsspec."""
    if _is_http(url):
        return (fetcher or Fetcher()).head_one(url)
    try:
        return object_identity(url)
    except (InputError, MissingDependencyError):
        return None


def url_stat(url: str, fetcher: Fetcher | None = None) -> tuple[int, int] | None:
    """(size, time stamp) of a URL, as a file's stat is to a rerun; None when its metadata
    cannot prove it unchanged (see :meth:`ObjectId.stamp`)."""
    found = url_identity(url, fetcher)
    stamp = None if found is None or found.size < 0 else found.stamp()
    return None if stamp is None else (found.size, stamp)
