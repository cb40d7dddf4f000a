"""``vggfeat extract``: the paper's dense multi-scale descriptors into a resumable HDF5 cache."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import click

from ..choices import (
    AGGREGATES,
    CROP_SCALES,
    DENSE_SCALES,
    DTYPES,
    ENGINES,
    MAX_ASPECT,
    POOLS,
    SHARD_IMAGES,
    SHARD_SECONDS,
    UNIT_IMAGES,
    WINDOW_BATCHES,
)
from .options import (
    HDF5Output,
    IntList,
    backend_option,
    check_layer_option,
    device_options,
    model_options,
)


class ActorRange(click.ParamType):
    """``MIN[:MAX]`` actors: ``4`` is a pool of 4, ``1:8`` grows from 1 to 8 while work waits."""

    name = "MIN[:MAX]"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            least, _, most = str(value).partition(":")
            pool = (int(least), int(most or least))
        except ValueError:
            pool = (0, 0)
        if not 1 <= pool[0] <= pool[1]:
            self.fail(f"{value!r}: give MIN or MIN:MAX actors, whole numbers with "
                      "1 ≤ MIN ≤ MAX (e.g. 4, or 1:8)", param, ctx)
        return pool


class FileOrStore(HDF5Output):
    """An HDF5 file, or a feature store: a folder, or a name without suffix (docs/store.md)."""

    def convert(self, value, param, ctx):
        from ..data.remote import is_url

        if is_url(str(value)):  # a store in a bucket, or a .h5 URL that extract refuses
            return value
        path = Path(value)
        try:
            is_store = path.is_dir() or (not path.exists() and path.suffix == "")
        except OSError as err:  # a name too long for the file system, a loop of links, …
            self.fail(f"{str(value)[:60]}{'…' if len(str(value)) > 60 else ''}: "
                      f"{err.strerror or err}; choose another name", param, ctx)
        return value if is_store else super().convert(value, param, ctx)


@click.command("extract")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@click.option("-o", "--output", required=True, type=FileOrStore(),
              help="HDF5 file (.h5/.hdf5) to write or update (an unfinished run lives in "
                   "OUTPUT.parts/), or a feature store: a folder, or a name without suffix, "
                   "of shards updated at the cost of what changed")
@click.option("--layer", default="fc7", show_default=True,
              help="layer to read: conv1_1 … conv5_4, pool1 … pool5, fc6, fc7, fc8, prob; "
                   "NAME:pre for the value before the ReLU")
@model_options
@click.option("--width-mult", type=click.FloatRange(0, min_open=True), default=None,
              help="reduced-width net: every conv layer's channels times this (quick runs, "
                   "with --weights random or weights of that width)")
@click.option("--fc-dim", type=click.IntRange(1), default=None,
              help="width of fc6/fc7 [default: 4096] (quick runs)")
@click.option("--scales", type=IntList(), default=None,
              help=f"smallest-side sizes Q [default: {','.join(map(str, DENSE_SCALES))}; with "
                   f"--crop, the resize sizes, default {CROP_SCALES[0]}]")
@click.option("--pool", type=click.Choice(POOLS), default="avg", show_default=True,
              help="global pooling of the layer's map")
@click.option("--aggregate", type=click.Choice(AGGREGATES), default="mean", show_default=True,
              help="combine scales by averaging or by stacking")
@click.option("--flip/--no-flip", default=None,
              help="average with the horizontally flipped image [default: on; off with --crop]")
@click.option("--l2/--no-l2", default=True, show_default=True, help="L2-normalise the descriptor")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="stored precision")
@click.option("--crop", type=click.IntRange(32), default=None,
              help="torchvision-style single centre crop of this size instead of dense evaluation")
@click.option("--max-aspect", type=click.FloatRange(1.0), default=MAX_ASPECT, show_default=True,
              help="centre-crop images longer than this ratio of their short side")
@device_options
@click.option("--amp", type=click.Choice(["bf16", "fp16"]), default=None,
              help="autocast the network (GPU)")
@backend_option
@click.option("--shard-size", type=click.IntRange(1), default=SHARD_IMAGES, show_default=True,
              help=f"publish finished images at least every N (or {SHARD_SECONDS:g} s): a kill "
                   "loses at most N finished images, plus those still waiting for their pass (at "
                   f"most {WINDOW_BATCHES} × --batch-size)")
@click.option("--num-shards", type=click.IntRange(1), default=None,
              help="share a store's work between N processes, each publishing its own units "
                   "[default: from a Slurm array's or torchrun's environment, else 1]")
@click.option("--shard-index", type=click.IntRange(0), default=None,
              help="which of the --num-shards shares this process computes (0 … N-1)")
@click.option("--unit-size", type=click.IntRange(1), default=UNIT_IMAGES, show_default=True,
              help="images per unit of work of a listing (processes sharing a store agree on it)")
@click.option("--image-column", default=None,
              help="Parquet inputs: the column holding the images (bytes, paths or URLs) "
                   "[default: the Hugging Face names: image, img, path, url, …]")
@click.option("--label-column", default=None,
              help="Parquet inputs: the column holding the labels [default: label, labels]")
@click.option("--engine", type=click.Choice(ENGINES), default="local", show_default=True,
              help="what computes the units: this process (or torchrun's ranks), or the actors "
                   "of a Ray cluster, into a feature store (docs/scale.md)")
@click.option("--ray-address", default=None,
              help="with --engine ray: the cluster to join (auto, HOST:PORT, ray://HOST:10001) "
                   "[default: a local Ray instance for this run]")
@click.option("--actors", type=ActorRange(), default=None,
              help="with --engine ray: MIN or MIN:MAX actors [default: 1 to one per GPU; one "
                   "per node on a cluster without GPUs]")
@click.option("--gpus-per-actor", type=click.FloatRange(0), default=None,
              help="with --engine ray: GPUs each actor takes, e.g. 0.5 for two per GPU "
                   "[default: 1 when the cluster has GPUs, else 0]")
@click.option("--overwrite", is_flag=True,
              help="recompute everything (also replaces an output made with other settings)")
@click.option("--verify", is_flag=True,
              help="count a file as changed when its content hash differs, not its size or mtime")
@click.option("--retry-failed", is_flag=True,
              help="try again the images recorded as failed, unchanged ones included")
@click.option("--strict", is_flag=True, help="fail on the first bad image instead of skipping it")
@click.option("--quiet", is_flag=True,
              help="no progress bars (the summary and warnings are still printed)")
def extract_command(paths, output, layer, arch, weights, width_mult, fc_dim, scales, pool,
                    aggregate, flip, l2, dtype, crop, max_aspect, batch_size, workers, device, amp,
                    backend, shard_size, num_shards, shard_index, unit_size, image_column,
                    label_column, engine, ray_address, actors, gpus_per_actor, overwrite, verify,
                    retry_failed, strict, quiet) -> None:
    """Extract descriptors of the images in PATHS (folders, image files, .txt/.csv lists of
    paths or URLs, URLs; into a store also WebDataset tars and patterns such as
    'train-{000..099}.tar' and Parquet files; local or on s3://, gs://, https://).

    Each image is rescaled to every Q in --scales, the net runs densely, the layer's map is
    globally pooled, averaged with the flipped image, combined over scales and L2-normalised
    (the paper's Appendix B).  Killed runs resume when the same command is run again, and a
    rerun on a finished OUTPUT updates it: rows of unchanged files are reused, new and changed
    files are computed, removed files are dropped.
    """
    check_layer_option(layer, arch)
    engine_options = {"address": ray_address, "actors": actors, "gpus_per_actor": gpus_per_actor}
    if engine == "local" and any(v is not None for v in engine_options.values()):
        raise click.UsageError("--ray-address, --actors and --gpus-per-actor go with "
                               "--engine ray")
    from ..descriptors import DescriptorSpec, ExtractOptions, extract
    from ..models import vgg

    spec = DescriptorSpec(layer=layer, scales=scales, pool=pool, aggregate=aggregate, flip=flip,
                          l2=l2, crop=crop, max_aspect=max_aspect)
    options = ExtractOptions(batch_size=batch_size, workers=workers, device=device, amp=amp,
                             backend=backend,
                             overwrite=overwrite, verify=verify, retry_failed=retry_failed,
                             strict=strict, progress=not quiet, shard_images=shard_size,
                             num_shards=num_shards, shard_index=shard_index,
                             unit_images=unit_size, image_column=image_column,
                             label_column=label_column)
    # A reduced width is a different net: its config is recorded with the output, so a rerun
    # with another width is refused like any other change of settings.
    model = (vgg(arch, weights=weights, width_mult=width_mult, fc_dim=fc_dim, progress=not quiet)
             if width_mult is not None or fc_dim is not None else None)
    if engine == "ray":  # (imports Ray only now: --help and argument errors stay quick)
        from ..engines.ray import extract_with_ray as run
    else:
        run, engine_options = extract, {}
    try:
        result = run(list(paths), output, spec=spec, model=model, arch=arch, weights=weights,
                     dtype=dtype, options=options, **engine_options)
    except SystemExit as stop:  # SIGTERM unwinds as exit status 143, after keeping the shards
        if stop.code == 128 + signal.SIGTERM and os.environ.get("RANK", "0") == "0":
            _report_stopped(output)
        raise
    _summarise(result, output)


def _summarise(result, output) -> None:
    """The summary line, the first failures, and how to retry them."""
    counts = (f"{result.reused} reused, {result.computed} computed, {result.removed} removed, "
              f"{result.num_failed} failed")
    if result.up_to_date:
        click.echo(f"{output} is up to date ({counts}): nothing to do (--overwrite recomputes "
                   "everything)", err=True)
    else:
        speed = (f" ({result.computed / result.seconds:.2f} img/s, images per forward: "
                 f"{result.images_per_forward:.1f}, backend: {result.backend})"
                 if result.computed and result.seconds
                 else "")
        click.echo(f"{result.num_images} images → {output}: {counts}{speed}", err=True)
        for path, reason in result.failed[:20]:
            click.echo(f"  skipped {path}: {reason}", err=True)
        if result.num_failed > 20:
            click.echo(f"  … {result.num_failed - 20} more in {output}:/failed", err=True)
    if result.num_failed:
        click.echo(f"  failures are recorded in {output}; fix those files and rerun with "
                   "--retry-failed to try them again (changed files are retried anyway)",
                   err=True)


def _report_stopped(output: str) -> None:
    from ..cache.location import is_remote, locate
    from ..cache.store import list_shards, parts_dir, read_index

    output = locate(output)
    if is_remote(output) or output.is_dir():  # a store: the run's shards are unlisted ones
        from ..cache.sharded import read_state, unlisted_shards

        parts, shards = output / "shards", unlisted_shards(output, read_state(output))
    else:
        parts = parts_dir(output)
        shards = list_shards(parts) if parts.is_dir() else []
    kept = sum(len(read_index(s).paths) for s in shards)
    click.echo(f"stopped by SIGTERM: {kept} images done so far are kept in {parts}; run the "
               "same command again to go on from them", err=True)
