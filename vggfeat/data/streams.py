"""Inputs read as streams, cut into units: WebDataset tars, Parquet row groups, URL lists.

A unit here is one tar, one Parquet row group, or a run of :data:`~vggfeat.choices.UNIT_IMAGES`
URLs of a list (see :mod:`vggfeat.data.units`).  Its fingerprint comes from metadata alone — a
tar's or Parquet file's size, time and ETag, or each URL's answer to a HEAD request — so a rerun
skips an unchanged unit without downloading it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..choices import UNIT_IMAGES
from ..errors import InputError
from .remote import Sample, expand, is_url, object_identity

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
LIST_SUFFIXES = (".txt", ".csv", ".lst")


def _suffix_of(name: str, suffixes) -> bool:
    return name.split("?")[0].lower().endswith(suffixes)


def is_stream_input(item: str) -> bool:
    """True for tars (and brace patterns of them), Parquet files, URLs, and lists of URLs."""
    item = str(item)
    if _suffix_of(item, TAR_SUFFIXES + PARQUET_SUFFIXES) or is_url(item):
        return True
    return _suffix_of(item, LIST_SUFFIXES) and os.path.isfile(item) and _lists_urls(item)


def _lists_urls(list_file: str) -> bool:
    """A .txt/.csv list whose first entry is a URL (or whose CSV header has ``url``)."""
    with open(list_file, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                if list_file.lower().endswith(".csv"):
                    return "url" in [c.strip() for c in line.split(",")]
                return is_url(line)
    return False


@dataclass(frozen=True)
class StreamUnit:
    """One tar, one Parquet row group, or URLs ``start:stop`` of a list."""

    id: str
    kind: str                 # "tar", "parquet" or "urls"
    source: str               # the tar or Parquet file; "" for URLs
    group: int = -1
    start: int = 0
    stop: int = 0


@dataclass
class StreamInputs:
    """The units of some inputs, with what reading them needs."""

    units: list[StreamUnit]
    urls: list[tuple[str, str | None]] = field(default_factory=list)  # (url, label)
    parquet: dict = field(default_factory=dict)  # file → vggfeat.data.parquet.ParquetInput

    def owner_sources(self) -> tuple[set[str], set[str]]:
        """(tar and Parquet files, URLs): what a current row's key may belong to."""
        return ({u.source for u in self.units if u.source}, {u for u, _ in self.urls})

    def owns(self, unit: StreamUnit, key: str) -> bool:
        if unit.kind == "urls":
            return key in self._unit_urls(unit)
        if not key.startswith(unit.source + "#"):
            return False
        if unit.kind == "tar":
            return True
        row = key[len(unit.source) + 1:]
        lo = sum(self.parquet[unit.source].row_groups[:unit.group])
        return row.isdigit() and lo <= int(row) < lo + self.parquet[unit.source].row_groups[
            unit.group]

    def _unit_urls(self, unit: StreamUnit) -> set[str]:
        return {u for u, _ in self.urls[unit.start:unit.stop]}

    def fingerprint(self, unit: StreamUnit, fetcher) -> str:
        """From metadata only: the container's identity, or every URL's HEAD answer."""
        digest = hashlib.sha256(unit.id.encode())
        if unit.kind == "urls":
            chunk = self.urls[unit.start:unit.stop]
            for (url, label), found in zip(chunk, fetcher.head([u for u, _ in chunk])):
                # No identity from the server: nothing proves the object unchanged.
                ident = "unknown" if found is None else repr(found)
                digest.update(f"{url}\t{label}\t{ident}\n".encode())
        else:
            digest.update(repr(object_identity(unit.source)).encode())
        return digest.hexdigest()

    def samples(self, unit: StreamUnit, fetcher) -> Iterator[Sample]:
        if unit.kind == "tar":
            from .webdataset import iter_tar

            yield from iter_tar(unit.source)
        elif unit.kind == "parquet":
            from .parquet import iter_row_group

            yield from iter_row_group(self.parquet[unit.source], unit.group, fetcher)
        else:
            chunk = self.urls[unit.start:unit.stop]
            for (_, label), sample in zip(chunk, fetcher.fetch([u for u, _ in chunk])):
                sample.label = label if sample.label is None else sample.label
                yield sample


def stream_inputs(inputs: list[str], *, image_column: str | None = None,
                  label_column: str | None = None, unit_images: int = UNIT_IMAGES
                  ) -> StreamInputs:
    """The units of ``inputs``: tars and tar patterns, Parquet files, URLs, URL lists."""
    found = StreamInputs([])
    for item in map(str, inputs):
        if _suffix_of(item, TAR_SUFFIXES):
            found.units += [StreamUnit(f"tar:{t}", "tar", t) for t in expand(item)]
        elif _suffix_of(item, PARQUET_SUFFIXES):  # images, paths or a url column
            _add_parquet(found, item, image_column, label_column)
        elif _suffix_of(item, LIST_SUFFIXES):
            from .urls import read_url_list

            found.urls += read_url_list(item)
        elif is_url(item):
            found.urls.append((item, None))
        else:
            raise InputError(f"{item}: mix no local folders or images with tars, Parquet files "
                             "or URLs in one run; extract them into the store in two runs")
    found.units += [StreamUnit(f"urls:{k // unit_images:08d}", "urls", "", -1, k,
                               min(k + unit_images, len(found.urls)))
                    for k in range(0, len(found.urls), unit_images)]
    ids = [u.id for u in found.units]
    if len(set(ids)) != len(ids):
        raise InputError("an input is given twice: each tar or Parquet file may appear once")
    return found


def _add_parquet(found: StreamInputs, item: str, image_column, label_column) -> None:
    from .parquet import inspect_parquet

    for path in expand(item):
        info = inspect_parquet(path, image_column, label_column)
        found.parquet[info.url] = info
        found.units += [StreamUnit(f"parquet:{info.url}#{g}", "parquet", info.url, g)
                        for g in range(len(info.row_groups))]
