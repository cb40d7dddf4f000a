"""Inputs read as streams, cut into units: WebDataset tars and Parquet row groups.

A unit here is one tar or one Parquet row group (see :mod:`vggfeat.data.units`; URLs of single
images are read like files).  Its fingerprint comes from metadata alone — the tar's or Parquet
file's size, time and ETag — so a rerun skips an unchanged unit without downloading it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import InputError
from .remote import Sample, expand, object_identity

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)


def _suffix_of(name: str, suffixes) -> bool:
    return name.split("?")[0].lower().endswith(suffixes)


def is_stream_input(item: str) -> bool:
    """True for tars (and brace patterns of them) and Parquet files, local or remote."""
    return _suffix_of(str(item), TAR_SUFFIXES + PARQUET_SUFFIXES)


@dataclass(frozen=True)
class StreamUnit:
    """One tar, or one row group of a Parquet file."""

    id: str
    kind: str                 # "tar" or "parquet"
    source: str               # the tar or Parquet file
    group: int = -1


@dataclass
class StreamInputs:
    """The units of some inputs, with what reading them needs."""

    units: list[StreamUnit]
    parquet: dict = field(default_factory=dict)  # file → vggfeat.data.parquet.ParquetInput

    def sources(self) -> set[str]:
        """The tars and Parquet files: what a current row's key may belong to."""
        return {u.source for u in self.units}

    def owns(self, unit: StreamUnit, key: str) -> bool:
        if not key.startswith(unit.source + "#"):
            return False
        if unit.kind == "tar":
            return True
        row = key[len(unit.source) + 1:]
        lo = sum(self.parquet[unit.source].row_groups[:unit.group])
        return row.isdigit() and lo <= int(row) < lo + self.parquet[unit.source].row_groups[
            unit.group]

    def fingerprint(self, unit: StreamUnit) -> str:
        """From metadata only: the tar's or Parquet file's size, time and ETag."""
        digest = hashlib.sha256(unit.id.encode())
        digest.update(repr(object_identity(unit.source)).encode())
        return digest.hexdigest()

    def samples(self, unit: StreamUnit, fetcher) -> Iterator[Sample]:
        if unit.kind == "tar":
            from .webdataset import iter_tar

            yield from iter_tar(unit.source)
        else:
            from .parquet import iter_row_group

            yield from iter_row_group(self.parquet[unit.source], unit.group, fetcher)


def stream_inputs(inputs: list[str], *, image_column: str | None = None,
                  label_column: str | None = None) -> StreamInputs:
    """The units of ``inputs``: tars and tar patterns, Parquet files (local or remote)."""
    found = StreamInputs([])
    for item in map(str, inputs):
        if _suffix_of(item, TAR_SUFFIXES):
            found.units += [StreamUnit(f"tar:{t}", "tar", t) for t in expand(item)]
        elif _suffix_of(item, PARQUET_SUFFIXES):  # images, paths or a url column
            _add_parquet(found, item, image_column, label_column)
        else:
            raise InputError(f"{item}: folders, images and URLs cannot be mixed with tars or "
                             "Parquet files in one run; extract them into two stores (a store "
                             "holds exactly the inputs of its latest run: a second run with "
                             "other inputs would drop the first run's rows)")
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
