"""Export a feature store as ``.npy`` embedding files with ``.parquet`` metadata beside them.

The layout that embedding-reader (``file_format="parquet_npy"``) and autofaiss read::

    DIR/emb/emb_00000.npy            N×D features (the store's dtype), rows sorted by path
    DIR/metadata/metadata_00000.parquet   the same N rows: ``path`` (and ``label``, ``class_name``)

Files of the two folders pair up in name order and hold the same rows.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import CacheError
from ..fileio import atomic_path
from .sharded import _targets, _view, check_export_target, read_store
from .store import check_free_space, io_error

EMB, METADATA = "emb", "metadata"
FILE_BYTES = 256 << 20  # features per .npy file: a few files per GiB, each read whole by readers


def export_npy(store: Path, folder: Path, *, overwrite: bool = False,
               file_bytes: int = FILE_BYTES) -> int:
    """Write the store's live rows as ``folder/emb/*.npy`` + ``folder/metadata/*.parquet``
    (pairs of at most ``file_bytes`` of features); the number of rows."""
    from ..optional import require

    pq = require("pyarrow.parquet", "parquet", "vggfeat store export --to-npy")
    pa = require("pyarrow", "parquet", "vggfeat store export --to-npy")
    _check_folder(store, folder, overwrite)
    state = read_store(store)
    rows = state.live_rows()
    view = _view(state, rows, max_open=16)
    row_bytes = view.dim * view.dtype.itemsize
    per_file = max(1, file_bytes // max(1, row_bytes))
    existing = next(p for p in (folder, *folder.parents) if p.is_dir())
    check_free_space(existing, len(rows) * (row_bytes + 200), f"export to {folder}")
    paths, targets = rows.paths, _targets(state, rows)
    try:
        for sub in (EMB, METADATA):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        for k, (lo, block) in enumerate(view.blocks(per_file)):
            with atomic_path(folder / EMB / f"emb_{k:05d}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, block)
            columns = {"path": paths[lo:lo + len(block)]}
            if targets is not None:
                columns["label"] = targets[lo:lo + len(block)]
                columns["class_name"] = [state.class_names[t] if t >= 0 else ""
                                         for t in columns["label"]]
            with atomic_path(folder / METADATA / f"metadata_{k:05d}.parquet") as tmp:
                pq.write_table(pa.table(columns), tmp)
    except OSError as err:
        raise io_error(err, "export to", folder) from err
    finally:
        view.close()
    return len(rows)


def _check_folder(store: Path, folder: Path, overwrite: bool) -> None:
    """A new or empty folder outside the store; with ``overwrite``, one this export wrote
    (its earlier files are removed first, so no stale file pairs up with new ones)."""
    check_export_target(store, folder, overwrite=True)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise CacheError(f"{folder} is not a folder: --to-npy writes a folder (emb/, metadata/)")
    if not folder.is_dir() or not any(folder.iterdir()):
        return
    ours = {EMB, METADATA}
    if not overwrite:
        raise CacheError(f"{folder} is not empty: pass --overwrite to replace an earlier "
                         "export there, or choose a new folder")
    if set(os.listdir(folder)) - ours:
        raise CacheError(f"{folder} holds files other than emb/ and metadata/: choose a new "
                         "folder (--overwrite replaces only an earlier export)")
    for sub, suffix in ((EMB, ".npy"), (METADATA, ".parquet")):
        for path in (folder / sub).glob(f"*{suffix}"):
            path.unlink()
