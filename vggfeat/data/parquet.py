"""Reading images stored in Parquet files (the Hugging Face datasets layout) one row group at a
time.

An image column is either a struct ``{bytes: binary, path: string}`` (what ``datasets`` writes
for an ``Image`` feature; default names ``image``, ``img``), a plain binary column of encoded
images, or a string column of paths or URLs (default names ``image_path``, ``path``, ``url``,
``file_name``).  A label column (default ``label``, ``labels``) holds ints or strings; the class
names of an int ``ClassLabel`` come from the file's ``huggingface`` schema metadata.
:func:`inspect_parquet` reads only the footer; :func:`iter_row_group` reads one row group, so a
file of any size is read in pieces and its row groups can be shared out.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Literal

from ..errors import InputError
from ..optional import require
from .remote import Sample, is_url, join_relative, open_binary

if TYPE_CHECKING:
    from .urls import Fetcher

__all__ = ["ParquetInput", "inspect_parquet", "iter_row_group"]

IMAGE_COLUMNS = ("image", "img")  # encoded images: struct {bytes, path} or binary
PATH_COLUMNS = ("image_path", "path", "url", "file_name")  # paths or URLs, read when needed
LABEL_COLUMNS = ("label", "labels")


@dataclass
class ParquetInput:
    """What :func:`inspect_parquet` learnt from a Parquet file's footer.

    ``url`` is the file (a local path made absolute), ``row_groups`` the rows in each row group,
    ``kind`` ``"bytes"`` when the image column holds the encoded images (a ``{bytes, path}``
    struct or binary) or ``"path"`` when it holds paths or URLs to read, ``class_names`` the
    ``ClassLabel`` names of an int label column (None when the file has none).
    """

    url: str
    num_rows: int
    row_groups: list[int]
    image_column: str
    label_column: str | None
    class_names: list[str] | None
    kind: Literal["bytes", "path"]


def _pyarrow():
    pa = require("pyarrow", "parquet", "reading Parquet inputs")
    pq = require("pyarrow.parquet", "parquet", "reading Parquet inputs")
    return pa, pq


def _open_parquet(url: str, f):
    """A ``pyarrow.parquet.ParquetFile`` over an open file, or :class:`InputError` naming
    ``url``."""
    pa, pq = _pyarrow()
    try:
        return pq.ParquetFile(f)
    except (pa.ArrowException, OSError) as err:
        raise InputError(f"{url}: not a readable Parquet file ({err})") from err


def _plain(pa, t):
    """A column type seen through dictionary encoding."""
    return t.value_type if pa.types.is_dictionary(t) else t


def _image_kind(pa, t) -> str | None:
    """``"bytes"`` for a ``{bytes, …}`` struct or a binary column, ``"path"`` for a string
    column, None for a column that cannot hold images."""
    t = _plain(pa, t)
    if pa.types.is_struct(t):
        field = t.get_field_index("bytes")
        binary = field >= 0 and (pa.types.is_binary(t.field(field).type)
                                 or pa.types.is_large_binary(t.field(field).type))
        return "bytes" if binary else None
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bytes"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "path"
    return None


def _is_label_type(pa, t) -> bool:
    t = _plain(pa, t)
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _find_image_column(pa, url, schema, asked: str | None) -> tuple[str, str]:
    """``(column, kind)`` of the images: the one asked for, else the first default name that
    holds images, else the first ``{bytes, path}`` struct column of any name."""
    if asked is not None:
        if asked not in schema.names:
            raise InputError(_missing(url, schema, f"no column {asked!r} (--image-column)"))
        kind = _image_kind(pa, schema.field(asked).type)
        if kind is None:
            raise InputError(f"{url}: column {asked!r} holds {schema.field(asked).type}, not "
                             f"images: --image-column needs a {{bytes, path}} struct, binary, "
                             f"or string paths/URLs")
        return asked, kind
    for name in IMAGE_COLUMNS + PATH_COLUMNS:
        if name in schema.names and _image_kind(pa, schema.field(name).type):
            return name, _image_kind(pa, schema.field(name).type)
    for field in schema:
        t = _plain(pa, field.type)
        if pa.types.is_struct(t) and t.get_field_index("path") >= 0 \
                and _image_kind(pa, t) == "bytes":
            return field.name, "bytes"
    tried = ", ".join(IMAGE_COLUMNS + PATH_COLUMNS)
    raise InputError(_missing(url, schema, f"no image column (looked for {tried})"))


def _find_label_column(pa, url, schema, asked: str | None) -> str | None:
    """The label column asked for, else the first default name with int or string labels,
    else None (the rows are unlabelled)."""
    if asked is None:
        return next((n for n in LABEL_COLUMNS
                     if n in schema.names and _is_label_type(pa, schema.field(n).type)), None)
    if asked not in schema.names:
        raise InputError(_missing(url, schema, f"no column {asked!r} (--label-column)"))
    if not _is_label_type(pa, schema.field(asked).type):
        raise InputError(f"{url}: column {asked!r} holds {schema.field(asked).type}; "
                         f"--label-column needs one int or string label per row")
    return asked


def _missing(url: str, schema, what: str) -> str:
    return (f"{url}: {what}; its columns are {', '.join(schema.names)}. Name the image column "
            f"with --image-column and the label column with --label-column")


def _class_names(schema, label_column: str | None) -> list[str] | None:
    """The ``ClassLabel`` names ``datasets`` records for ``label_column`` in the schema's
    ``huggingface`` metadata (``{"info": {"features": {col: {"_type": "ClassLabel",
    "names": [...]}}}}``), or None."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if label_column is None or raw is None:
        return None
    try:
        meta = json.loads(raw)
        feature = meta.get("info", {}).get("features", {}).get(label_column, {})
    except (ValueError, AttributeError):
        return None  # metadata vggfeat cannot read is no reason to refuse the file
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" \
            and isinstance(feature.get("names"), list):
        return [str(n) for n in feature["names"]]
    return None


def inspect_parquet(url: str, image_column: str | None = None,
                    label_column: str | None = None) -> ParquetInput:
    """Describe the Parquet file at ``url`` (a local path or any fsspec URL) from its footer
    alone: rows per row group, which column holds the images (and how), which the labels,
    and the class names.

    ``image_column``/``label_column`` name the columns (``--image-column``,
    ``--label-column``); without them the usual Hugging Face names are tried.  Raises
    :class:`InputError` naming the file and its columns when there is no usable image column
    (or a named column is missing).
    """
    pa, _ = _pyarrow()
    url = url if is_url(url) else os.path.abspath(url)
    with open_binary(url) as f:
        pf = _open_parquet(url, f)
        schema = pf.schema_arrow
        groups = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    image, kind = _find_image_column(pa, url, schema, image_column)
    label = _find_label_column(pa, url, schema, label_column)
    return ParquetInput(url=url, num_rows=sum(groups), row_groups=groups, image_column=image,
                        label_column=label, class_names=_class_names(schema, label),
                        kind=kind)


def _read_group(info: ParquetInput, group: int) -> tuple[list, list]:
    """The image cells and labels of one row group, read alone (only the needed columns)."""
    if not 0 <= group < len(info.row_groups):
        raise InputError(f"{info.url}: has {len(info.row_groups)} row groups, no group {group}")
    columns = [info.image_column] + ([info.label_column] if info.label_column else [])
    with open_binary(info.url) as f:
        table = _open_parquet(info.url, f).read_row_group(group, columns=columns)
    images = table.column(info.image_column).to_pylist()
    labels = (table.column(info.label_column).to_pylist() if info.label_column
              else [None] * len(images))
    return images, labels


def _label_text(info: ParquetInput, value) -> str | None:
    """A stored label as text: a ``ClassLabel`` index becomes its name (a negative one, the
    ``datasets`` mark of an unlabelled row, becomes None); other ints their digits."""
    if value is None:
        return None
    if isinstance(value, int) and info.class_names is not None:
        if value < 0:
            return None
        if value >= len(info.class_names):
            raise ValueError(f"label {value} is not one of the file's "
                             f"{len(info.class_names)} class names")
        return info.class_names[value]
    return str(value)


def _cell(info: ParquetInput, value) -> bytes | str | None:
    """What a row's image cell gives: encoded bytes, a location to read (resolved against the
    Parquet file's folder), or None when it holds neither."""
    if isinstance(value, dict):  # the {bytes, path} struct: bytes win, the path is a fallback
        if value.get("bytes") is not None:
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value:
        return join_relative(info.url, value)
    return None


@dataclass
class _Pending:
    """A row whose image is still to be read from ``location``."""

    key: str
    label: str | None
    location: str


def _plan(info: ParquetInput, start: int, images: list, labels: list
          ) -> list[Sample | _Pending]:
    """One entry per row: a finished Sample (bytes in the file, or why it failed), or the
    location its image is to be read from."""
    plan: list[Sample | _Pending] = []
    for i, (image, raw_label) in enumerate(zip(images, labels)):
        key = f"{info.url}#{start + i}"
        try:
            label = _label_text(info, raw_label)
        except ValueError as err:
            plan.append(Sample.failed(key, str(err)))
            continue
        cell = _cell(info, image)
        if cell is None:
            plan.append(Sample.failed(key, f"no image in the row ({info.image_column} is null)",
                                      label))
        elif isinstance(cell, bytes):
            plan.append(Sample.ok(key, cell, label))
        else:
            plan.append(_Pending(key, label, cell))
    return plan


def iter_row_group(info: ParquetInput, group: int, fetcher: Fetcher | None = None
                   ) -> Iterator[Sample]:
    """The Samples of row group ``group`` of the file :func:`inspect_parquet` described, in
    row order, reading that row group only.

    Keys are ``"<url>#<row number in the file>"``; ``mtime_ns`` is -1 (the file's own
    :class:`~vggfeat.data.remote.ObjectId` identifies its rows).  Images held as paths or URLs
    (the ``path`` kind, or a struct whose ``bytes`` is null) are read with ``fetcher`` (a
    :class:`~vggfeat.data.urls.Fetcher` with the default settings when None), relative paths
    relative to the Parquet file's folder; a failed read gives a failed Sample whose reason
    names the location.
    """
    images, labels = _read_group(info, group)
    plan = _plan(info, sum(info.row_groups[:group]), images, labels)
    del images  # the encoded images now live in the plan's Samples only
    todo = [p.location for p in plan if isinstance(p, _Pending)]
    if not todo:
        yield from plan
        return
    if fetcher is None:
        from .urls import Fetcher
        fetcher = Fetcher()
    fetched = fetcher.fetch(todo)  # lazily, in order: only a window of reads is in memory
    try:
        for entry in plan:
            if isinstance(entry, Sample):
                yield entry
                continue
            got = next(fetched)
            reason = None if got.data is not None else f"{entry.location}: {got.reason}"
            yield dataclasses.replace(got, key=entry.key, label=entry.label, reason=reason,
                                      mtime_ns=-1)
    finally:
        fetched.close()  # a caller that stops early stops the downloads too
