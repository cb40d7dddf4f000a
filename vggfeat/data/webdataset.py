"""Reading WebDataset tar shards as a stream of :class:`~vggfeat.data.remote.Sample` objects.

A shard is a tar (plain or gz/bz2/xz compressed) whose members are grouped into samples by
WebDataset's rule: a member's sample key is its path up to the first dot of its base name, the
rest is its extension (``a/b/x.seg.jpg`` → key ``a/b/x``, extension ``seg.jpg``); consecutive
members with the same key form one sample.  A sample's image is its first member whose
extension ends in an image suffix (``jpg``, ``png``, ``webp``, …, any case); its label is the
text of a ``.cls`` member, else the ``label`` (or ``cls``) field of a ``.json`` member.

The tar is streamed (``tarfile`` mode ``r|*``) from a local path or any fsspec URL: nothing is
seeked and nothing but the shard's bytes is read.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from typing import Iterator

from ..errors import InputError
from .remote import Sample, is_url, open_binary
from .sources import IMAGE_EXTENSIONS

__all__ = ["iter_tar", "split_key", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
# WebDataset's own rule (webdataset.tariterators.base_plus_ext): a member without a dot in its
# base name, or whose base name starts with one, belongs to no sample and is skipped.
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


def split_key(name: str) -> tuple[str, str] | None:
    """``(sample key, extension)`` of a member path, or None for a member no sample owns."""
    match = _KEY.match(name)
    return (match.group(1), match.group(2)) if match else None


def iter_tar(url: str) -> Iterator[Sample]:
    """The samples of the tar shard at ``url`` (a local path or any fsspec URL), in tar order.

    Each :class:`Sample` has the key ``"<url>#<sample key>"`` (a local path made absolute), the
    image member's bytes and modification time, and the label.  A sample without an image
    member, or with a label that cannot be read, comes as a failed Sample saying why.
    Directories, links and other non-file members are skipped.

    A damaged shard (truncated, or not a tar at all) raises :class:`InputError` naming it,
    *after* yielding every complete sample read before the damage: the sample being read when
    the stream broke is not yielded, since its members may be missing.  The caller decides
    whether what was read counts; a failed row would hide that the shard itself is broken.
    """
    name = url if is_url(url) else os.path.abspath(url)
    count = 0
    with open_binary(url) as f:
        try:
            for key, members in _groups(f):
                count += 1
                yield _sample(f"{name}#{key}", members)
        except (tarfile.TarError, EOFError, OSError, ValueError) as err:
            # gzip.BadGzipFile is an OSError, zlib.error / lzma.LZMAError surface as these too
            raise InputError(f"{name}: not a readable tar ({type(err).__name__}: {err}); "
                             f"{count} samples were read before the damage. Check or "
                             f"re-create the shard") from err


def _groups(f) -> Iterator[tuple[str, list[tuple[str, bytes, int]]]]:
    """``(sample key, [(extension, bytes, mtime), …])`` for each run of consecutive members
    with the same key; a group is yielded only once the next one starts and the last one only
    once the tar has ended properly, so every group yielded is complete."""
    key, members = None, []
    tarinfo, end = _watched_tarinfo()
    with tarfile.open(fileobj=f, mode="r|*", tarinfo=tarinfo) as tar:
        for info in tar:
            if not info.isfile():
                continue
            split = split_key(info.name)
            if split is None:
                continue
            if split[0] != key:
                if members:
                    yield key, members
                key, members = split[0], []
            member = tar.extractfile(info)
            members.append((split[1], member.read() if member is not None else b"", info.mtime))
    if not isinstance(end[0], tarfile.EOFHeaderError):
        # tarfile ends quietly on a cut or garbled header; a whole tar ends with zero blocks
        raise tarfile.ReadError("truncated: the stream ends inside a member header" if
                                isinstance(end[0], (tarfile.TruncatedHeaderError,
                                                    tarfile.EmptyHeaderError)) else
                                f"it stops at a damaged member header ({end[0]})")
    if members:
        yield key, members


def _watched_tarinfo() -> tuple[type[tarfile.TarInfo], list]:
    """A TarInfo class for one tar, and a one-item list that holds why its last header read
    ended the archive: ``EOFHeaderError`` for the zero block of a whole tar; a truncated or
    invalid header otherwise, which tarfile's stream reader takes for the end without a
    word."""
    end: list = [None]

    class Watched(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf, encoding, errors):
            try:
                return super().frombuf(buf, encoding, errors)
            except tarfile.HeaderError as err:
                end[0] = err
                raise

    return Watched, end


def _sample(key: str, members: list[tuple[str, bytes, int]]) -> Sample:
    """One sample from its members: the first image member's bytes, the label from ``.cls``
    or ``.json``."""
    image = next((m for m in members if m[0].rsplit(".", 1)[-1].lower() in IMAGE_SUFFIXES), None)
    mtime_ns = (image or members[0])[2] * 1_000_000_000
    try:
        label = _label(members)
    except ValueError as err:
        return Sample.failed(key, str(err), mtime_ns=mtime_ns)
    if image is None:
        has = ", ".join(f".{m[0]}" for m in members)
        return Sample.failed(key, f"no image member (has: {has})", label, mtime_ns)
    return Sample.ok(key, image[1], label, mtime_ns)


def _label(members: list[tuple[str, bytes, int]]) -> str | None:
    """The sample's label: the stripped text of its ``.cls`` member, else the ``label`` (or
    ``cls``) field of its ``.json``; None when it has neither.  Raises ValueError (the failed
    sample's reason) for a label member that cannot be read."""
    by_ext = {}
    for ext, data, _ in members:
        by_ext.setdefault(ext.lower(), data)
    if "cls" in by_ext:
        try:
            text = by_ext["cls"].decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise ValueError(f"unreadable label: .cls is not UTF-8 text ({err})") from err
        return text or None
    if "json" not in by_ext:
        return None
    try:
        meta = json.loads(by_ext["json"])
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"unreadable label: .json is not valid JSON ({err})") from err
    value = meta.get("label", meta.get("cls")) if isinstance(meta, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"unreadable label: .json label is {value!r}, not one class name or "
                         f"number")
    return str(value).strip() or None
