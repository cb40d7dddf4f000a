"""``vggfeat store``: look into, compact and export a feature store (a folder of shards)."""

from __future__ import annotations

from pathlib import Path

import click

class StoreName(click.Path):
    """A store's folder, or a store in a bucket (``s3://bucket/feats``): a URL is kept as one
    (a Path would fold its ``//``)."""

    def __init__(self) -> None:
        super().__init__(file_okay=False, path_type=Path)

    def convert(self, value, param, ctx):
        from ..cache.location import locate

        where = locate(value)
        return where if not isinstance(where, Path) else super().convert(where, param, ctx)


STORE = StoreName()


@click.group("store")
def store_group() -> None:
    """Feature stores: the folders `vggfeat extract -o FOLDER` writes (docs/store.md)."""


@store_group.command("info")
@click.argument("store", type=STORE)
def info_command(store: Path) -> None:
    """Rows, shards, live and dead bytes, settings, failures of STORE."""
    from ..cache.sharded import describe

    for line in describe(store):
        click.echo(line)


@store_group.command("compact")
@click.argument("store", type=STORE)
@click.option("--threshold", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.5,
              show_default=True, help="rewrite shards with at least this fraction of dead entries")
def compact_command(store: Path, threshold: float) -> None:
    """Rewrite STORE's mostly dead shards and delete retired ones (crash-safe).  A store in a
    bucket is not locked: compact it while no writer runs (docs/store.md)."""
    from contextlib import nullcontext

    from ..cache.lock import OutputLock
    from ..cache.sharded import compact, read_store
    from ..cache.store import readable_size

    read_store(store)  # a damaged or foreign store is named before anything is written
    with OutputLock(store) if isinstance(store, Path) else nullcontext():
        done = compact(store, threshold=threshold)
    click.echo(f"{store}: {done.rewritten} shards rewritten into {done.new_shards}, "
               f"{done.retired} files deleted; live shards {readable_size(done.bytes_before)} "
               f"→ {readable_size(done.bytes_after)}", err=True)


class LocalPath(click.Path):
    """A path on this machine: a URL is refused (a Path would turn s3://b/x into s3:/b/x)."""

    def convert(self, value, param, ctx):
        from ..data.remote import is_url

        if is_url(str(value)):
            self.fail(f"{value}: exports are written on this machine; write a local file, "
                      "then upload it (e.g. aws s3 cp FILE URL)", param, ctx)
        return super().convert(value, param, ctx)


@store_group.command("export")
@click.argument("store", type=STORE)
@click.option("--to", "to", type=LocalPath(dir_okay=False, path_type=Path),
              help="the .h5/.hdf5 file to write, in the layout of a single-file output")
@click.option("--to-npy", "to_npy", type=LocalPath(file_okay=False, path_type=Path),
              help="a folder to write as emb/*.npy + metadata/*.parquet (the paths), the layout "
                   "embedding-reader and autofaiss read (needs pyarrow: vggfeat[parquet])")
@click.option("--overwrite", is_flag=True, help="replace the file, or an earlier --to-npy export")
def export_command(store: Path, to: Path | None, to_npy: Path | None, overwrite: bool) -> None:
    """Write STORE's live rows (sorted by path) as one feature file, or as .npy files."""
    if (to is None) == (to_npy is None):
        raise click.UsageError("give one of --to FILE.h5 and --to-npy FOLDER")
    if to_npy is not None:
        from ..cache.npy import export_npy

        rows = export_npy(store, to_npy, overwrite=overwrite)
    else:
        from ..cache.sharded import export_file

        rows = export_file(store, to, overwrite=overwrite)
    click.echo(f"{rows} rows of {store} → {to or to_npy}", err=True)
