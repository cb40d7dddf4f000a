"""``vggfeat extract``: descriptors for a list of images into an HDF5 file kept up to date.

Decoding and rescaling run in DataLoader workers, overlapped with the network.  Results are
published in shards (see :mod:`vggfeat.cache.store`), so a run killed at any moment, SIGKILL
included, resumes where it stopped when the same command is run again.  A rerun on a finished
output reuses the rows of unchanged files, computes new and changed ones and drops removed ones
(:mod:`vggfeat.cache.update`).  One process (or one ``torchrun`` job) writes an output at a time.
Under ``torchrun`` rank 0 decides what to compute, the images are split between the ranks in
contiguous blocks with no padding, and rank 0 joins the shards into the one output file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from itertools import chain
from pathlib import Path

import h5py
import numpy as np
import torch

from .. import __version__
from ..choices import DTYPES, SHARD_IMAGES, SHARD_SECONDS, UNIT_IMAGES
from ..cache import location
from ..cache.location import Where, check_reachable, is_remote, listing, locate, refuse_remote_file
from ..cache.lock import OutputLock
from ..cache.store import (
    MANIFEST,
    MISSING,
    FileIds,
    Index,
    check_suffix,
    check_writable,
    file_identity,
    index_of,
    descriptor_groups,
    io_error,
    list_shards,
    parts_dir,
    open_features,
    read_attrs,
    read_index,
    remove_leftovers,
    stat_files,
    write_features,
    write_shard,
)
from ..cache.sharded import (
    INDEX,
    SETTINGS,
    SHARDS,
    after_update,
    current,
    input_labels,
    is_store,
    locate_inputs,
    plan_changes,
    planning_sources,
    publish_update,
    read_settings,
    read_state,
    remove_stale_temporaries,
    store_attrs,
    unlisted_shards,
    write_settings,
)
from ..cache.settings import (
    ALT,
    DESCRIPTOR_SETTINGS,
    file_group,
    new_group,
    settings_of,
    store_for,
)
from ..cache.update import Output, Plan, plan_update
from ..data.images import BadImage, decode_image
from ..data.loader import PreparedImages, image_loader
from ..data.remote import is_url
from ..data.sources import ImageList, gather_images
from ..data.streams import PARQUET_SUFFIXES, is_stream_input, stream_inputs
from ..data.units import Unit, WorkShare, file_units, files_fingerprint
from ..data.urls import Fetcher, url_stat
from ..devices import default_device, default_workers
from ..distributed import Distributed
from ..errors import CacheError, ConfigError, ExtractError, VGGFeatError
from ..fileio import write_json_atomic
from ..models.backends import check_backend
from ..models.factory import vgg
from ..models.vgg import VGG
from ..progress import image_bar
from .descriptor import DescriptorNet, DescriptorSpec, prepare
from .streamed import StreamRun, drop_vanished



@dataclass(frozen=True)
class ExtractOptions:
    """How :func:`extract` runs and updates its output; none of these change the descriptors.

    Running:
        batch_size: images per forward pass (flips double it).
        workers: DataLoader worker processes for decoding (default: half the cores, ≤ 8).
        device: ``cpu``, ``cuda``, ``cuda:1`` … (default: cuda when available).
        amp: ``bf16``/``fp16`` autocast for the network (GPU).
        backend: ``auto``, ``eager`` or ``winograd``: how the net's layers run (see
            :mod:`vggfeat.models.backends`); descriptors agree to about 1e-5 across backends.
        progress: show a progress bar.
        shard_images, shard_seconds: publish results at least this often (what a kill can cost).
        download: allow fetching hub weights missing from the local cache.

    Updating an existing output:
        overwrite: recompute everything, whatever the output and an unfinished run hold; also
            replaces an output made with other settings.
        verify: a file counts as changed when its content hash differs (default: its size or
            mtime), so rows are reused after a copy or a ``touch`` and never for edited content.
        retry_failed: try again the images recorded as failed (unchanged files included).
        strict: stop at the first unreadable image instead of recording it.

    Sharing a store between processes (see docs/scale.md):
        num_shards, shard_index: this process computes units ``k`` with ``k % num_shards ==
            shard_index`` and publishes them itself (default: from a Slurm array's or
            torchrun's environment, else everything).
        unit_images: images per unit of a folder listing or list file (the processes sharing
            a store must agree on it; another value only costs one rerun its skipping).
        only_units: compute these units (ids, see :func:`plan_units`) and nothing else, as one
            of many workers an engine drives (see vggfeat.engines); ``()`` with the first
            share: only drop the rows of images that are no longer inputs.

    Parquet inputs (see docs/scale.md):
        image_column, label_column: the columns holding the images (bytes, paths or URLs) and
            the labels, when they are not the Hugging Face names (``image``, ``label``, …).
        add: add the inputs to the output rather than make it hold exactly them (what
            ``VGGFeatures(cache=…)`` does): rows of other images, and their labels, are kept;
            a setting the output does not hold is written beside its own (a named group of the
            file, a sub-store ``alt/NAME`` of the store) instead of refused; and a run waits
            for another writer of the output instead of failing.
    """

    batch_size: int = 8
    workers: int | None = None
    device: str | None = None
    amp: str | None = None
    backend: str = "auto"
    progress: bool = True
    shard_images: int = SHARD_IMAGES
    shard_seconds: float = SHARD_SECONDS
    download: bool = True
    overwrite: bool = False
    verify: bool = False
    retry_failed: bool = False
    strict: bool = False
    num_shards: int | None = None
    shard_index: int | None = None
    unit_images: int = UNIT_IMAGES
    only_units: tuple[str, ...] | None = None
    image_column: str | None = None
    label_column: str | None = None
    add: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.unit_images < 1:
            raise ConfigError(f"unit_images must be ≥ 1, got {self.unit_images}")
        if self.shard_images < 1:
            raise ConfigError(f"shard_images must be ≥ 1, got {self.shard_images}")
        check_backend(self.backend)


@dataclass
class ExtractResult:
    """What a run did: rows in the output, and how many were reused, computed, removed."""

    output: Path
    num_images: int  # rows in the output
    num_failed: int  # failures recorded in the output
    computed: int    # rows computed by this invocation, all ranks (failures: num_failed only)
    seconds: float
    failed: list[tuple[str, str]] = field(default_factory=list)
    up_to_date: bool = False
    reused: int = 0   # rows reused from the existing output or an unfinished run
    removed: int = 0  # entries dropped because their file is no longer an input
    images_per_forward: float = 0.0  # in this process's forward passes, flips not counted
    backend: str = ""  # what ran the net (``auto`` resolved), where it ran


def extract(inputs: list[str | os.PathLike] | ImageList, output: str | os.PathLike, *,
            spec: DescriptorSpec = DescriptorSpec(), model: VGG | None = None,
            arch: str | None = None, weights: str | None = "torchvision", dtype: str = "float32",
            options: ExtractOptions | None = None, **option_values) -> ExtractResult:
    """Compute ``spec`` descriptors of every input image into ``output`` (HDF5), or update it.

    A rerun with the same settings brings ``output`` up to date with the current inputs: rows of
    unchanged files are reused, new and changed files are computed, rows of removed files are
    dropped.  Different descriptor settings are refused (``overwrite`` replaces the file's root);
    other settings a file holds in named groups (a ``VGGFeatures`` cache's) are kept as they are.
    With ``add=True`` (what ``VGGFeatures(cache=…)`` runs) the inputs are added instead and
    a setting the output does not hold is stored beside its own (:class:`ExtractOptions`).

    Args:
        inputs: folders, image files, ``.txt``/``.csv`` lists, or an :class:`ImageList`.
        output: the ``.h5``/``.hdf5`` file; an unfinished run keeps its work in ``OUTPUT.parts/``.
        spec: the descriptor (layer, scales, pooling, flip, aggregation, L2, crop).
        model, arch, weights: the net, or how to build it (:func:`vggfeat.vgg`).
        dtype: stored precision, ``float32`` or ``float16``.
        options: an :class:`ExtractOptions`; ``option_values`` override its fields, e.g.
            ``extract(images, "f.h5", workers=0, verify=True)``.
    """
    opts = replace(options or ExtractOptions(), **option_values)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    start = time.monotonic()
    output = locate(output)  # a Path, or a store in a bucket (vggfeat.cache.location)
    store, share, dist = _place(output, opts)
    if (opts.image_column or opts.label_column) and (isinstance(inputs, ImageList) or not any(
            str(i).split("?")[0].lower().endswith(PARQUET_SUFFIXES) for i in inputs)):
        raise ConfigError("--image-column/--label-column name columns of Parquet inputs, and "
                          "no input is a .parquet file: drop them")
    if not isinstance(inputs, ImageList) and any(is_stream_input(str(i)) for i in inputs):
        return _extract_streams([str(i) for i in inputs], output, store, share, dist, spec,
                                model, arch, weights, dtype, opts)
    images = inputs if isinstance(inputs, ImageList) else gather_images(list(inputs))
    # Planning needs only what the net is (its settings), not the net: it is built, and its
    # backend chosen, once something must be computed.
    described = model if model is not None else described_model(arch, weights, opts.download)
    described.check_layer(spec.layer)
    settings = descriptor_settings(described, spec, dtype)
    dim = spec.dim(described.layer_channels(spec.layer))
    alone, first, lock = _roles(output, share, opts)
    net = None
    try:
        opening = (partial(_open_store, share=share, first=first, alone=alone) if store
                   else _open)
        opened = _main_decides(dist, lambda: opening(output, images, settings, opts, lock))
        target, group, todo = dist.broadcast_object(None if opened is None else (
            opened.target, opened.group, None if opened.plan is None else opened.plan.compute))
        plan = None if opened is None else opened.plan
        if todo is None:
            attrs = _attrs(target, group)
            return ExtractResult(target, attrs["num_images"], attrs["num_failed"], 0,
                                 time.monotonic() - start, up_to_date=True,
                                 reused=attrs["num_images"])
        parts = target / SHARDS if store else parts_dir(target, group)
        known = set(list_shards(parts)) if dist.is_main else set()
        if len(todo):
            net = _descriptor_net(model, arch, weights, spec, dist, opts)
            work = plan.store_state.images if store else images
            _compute(net, work, np.array_split(todo, dist.world_size)[dist.rank], parts,
                     dist, opts, dtype, labelled=store)
        dist.barrier()  # every shard is published before rank 0 joins them
        finish = _finish_store if store else _finish
        computed = dist.broadcast_object(_main_decides(
            dist, lambda: finish(plan, known, target, images, settings, described, dim,
                                 len(spec.scales), dtype)))
    finally:
        if lock is not None:
            lock.release()
    return _result(target, group, store, plan, net, computed, time.monotonic() - start)


def _extract_streams(inputs: list[str], output: Path, store: bool, share: WorkShare,
                     dist: Distributed, spec: DescriptorSpec, model, arch, weights, dtype: str,
                     opts: ExtractOptions) -> ExtractResult:
    """:func:`extract` of tars and Parquet files (vggfeat.descriptors.streamed)."""
    if not store:
        raise ConfigError(f"tars and Parquet files are extracted into a feature store "
                          f"(a folder, e.g. -o {output.with_suffix('').name}), not into one "
                          "file: export the store to a file when done (vggfeat store export)")
    start = time.monotonic()
    found = stream_inputs(inputs, image_column=opts.image_column,
                          label_column=opts.label_column)
    described = model if model is not None else described_model(arch, weights, opts.download)
    described.check_layer(spec.layer)
    settings = descriptor_settings(described, spec, dtype)
    writer = _file_attrs(settings, described)
    alone, first, lock = _roles(output, share, opts)
    net, run = None, None
    try:
        changed, fingerprints, state = _changed_streams(output, found, settings, share, opts,
                                                        lock)
        if changed:
            net = _descriptor_net(model, arch, weights, spec, dist, opts)
            run = StreamRun(output, found, changed, fingerprints, net, dtype, writer,
                            default_workers() if opts.workers is None else opts.workers,
                            opts.progress)
            run.run({} if opts.overwrite else state.live_hashes())
        removed = drop_vanished(output, found, writer, alone) if first else 0
    finally:
        if lock is not None:
            lock.release()
    for error in run.errors if run else ():
        warnings.warn(f"{error}; its unit is computed again by the next run", UserWarning,
                      stacklevel=3)
    attrs = store_attrs(output)
    return ExtractResult(output, attrs["num_images"], attrs["num_failed"],
                         run.computed if run else 0, time.monotonic() - start, attrs["failed"],
                         up_to_date=not changed and not removed,
                         reused=attrs["num_images"] - (run.computed if run else 0),
                         removed=removed + (run.removed if run else 0),
                         images_per_forward=net.images_per_forward if net else 0.0,
                         backend=net.backend if net else "")


def _changed_streams(store: Path, found, settings: dict, share: WorkShare,
                     opts: ExtractOptions, lock: OutputLock | None):
    """(this process's stream units whose fingerprint changed, every fingerprint, state)."""
    mine = _my_units(found.units, share, opts.only_units)
    # First: a missing tar is an error before the store is created or touched.
    fingerprints = {u.id: found.fingerprint(u) for u in mine}
    _check_store_writable(store)
    if lock is not None:
        lock.acquire()
    _open_settings(store, settings)
    _mkdir(store / SHARDS)
    remove_stale_temporaries(store)
    state = read_state(store)
    redo = opts.overwrite or opts.retry_failed
    return ([u for u in mine if redo or state.units.get(u.id) != fingerprints[u.id]],
            fingerprints, state)


def _place(output: Path, opts: ExtractOptions) -> tuple[bool, WorkShare, Distributed]:
    """Whether ``output`` is a store, this process's share of its units, and its place in a
    run.  Processes sharing a store's units (a Slurm array, torchrun's ranks) never wait for
    one another: each publishes its own units, so none merges the others' work."""
    store = is_store(output)
    if not store:
        refuse_remote_file(output)
        check_suffix(output)
        if opts.num_shards is not None or opts.shard_index is not None:
            raise ConfigError(f"--num-shards/--shard-index share a feature store's units; "
                              f"{output} is one file: write to a store (a folder name, e.g. "
                              f"{output.with_suffix('').name}) and export it when done")
    share = WorkShare.resolve(opts.num_shards, opts.shard_index) if store else WorkShare()
    device = opts.device or default_device()
    return store, share, Distributed.alone(device) if store else Distributed.from_env(device)


def _result(target: Path, group: str, store: bool, plan: Plan | None, net, computed: int,
            seconds: float) -> ExtractResult:
    attrs = _attrs(target, group)
    failed = attrs.get("failed", []) if store else (
        _failures(target, group) if attrs["num_failed"] else [])
    return ExtractResult(target, attrs["num_images"], attrs["num_failed"], computed,
                         seconds, failed,
                         reused=plan.reused + getattr(plan.store_state, "skipped_rows", 0)
                         if plan is not None else 0,
                         removed=plan.removed if plan is not None else 0,
                         images_per_forward=net.images_per_forward if net else 0.0,
                         backend=net.backend if net else "")


def _descriptor_net(model: VGG | None, arch, weights, spec: DescriptorSpec, dist: Distributed,
                    opts: ExtractOptions) -> DescriptorNet:
    if model is None:
        # Built as the runner runs it (eval, channels_last), so the runner need not copy its
        # 0.5 GB of weights: a net of our own needs no protection.
        model = vgg(arch, weights=weights, download=opts.download,
                    progress=opts.progress and dist.is_main
                    ).eval().to(memory_format=torch.channels_last)
    return DescriptorNet(model, spec, device=dist.device, batch_size=opts.batch_size,
                         amp=opts.amp, backend=opts.backend)


@dataclass
class _Opened:
    """Where a run writes (a file and its group, or a store) and its plan (None: up to date)."""

    target: Path
    group: str
    plan: Plan | None


def described_model(arch: str | None, weights, download: bool = True) -> VGG:
    """The net ``vgg(arch, weights=…)`` would build, with its config, weights' provenance and
    preprocessing, but its tensors on the ``meta`` device: no memory, no initialisation, so
    its settings cost a read and a hash of the weights file, not a net."""
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")
            return vgg(arch, weights=weights, download=download, progress=False)
    except VGGFeatError:
        raise
    except (RuntimeError, NotImplementedError):  # a step that needs real values: build it
        return vgg(arch, weights=weights, download=download, progress=False)


def descriptor_settings(model: VGG, spec: DescriptorSpec, dtype: str) -> dict:
    """What makes two descriptors comparable: the net, its weights, the descriptor, the dtype."""
    meta = model.weights_meta
    return {"arch": model.spec.name, "model_config": json.dumps(model.config, sort_keys=True),
            "weights": meta.get("name") or meta.get("file") or meta.get("source", "random"),
            "weights_sha256": meta.get("sha256", ""),
            "preprocessing": model.preprocessing.to_json(), **spec.to_attrs(), "dtype": dtype}


def settings_difference(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in DESCRIPTOR_SETTINGS
            if old.get(k) != new.get(k)]


# -- the steps of a run ----------------------------------------------------------------------------

def _main_decides(dist: Distributed, decide):
    """Run ``decide()`` on rank 0; a user error there is raised on every rank (none hangs)."""
    value, error = None, None
    if dist.is_main:
        try:
            value = decide()
        except VGGFeatError as err:
            error = err
    error = dist.broadcast_object(error)
    if error is not None:
        raise error
    return value


def _open(output: Path, images: ImageList, settings: dict, opts: ExtractOptions,
          lock: OutputLock) -> _Opened:
    """Lock ``output``, check it against ``settings`` and plan the update of the group that
    holds them."""
    check_writable(output)
    lock.acquire()
    group, old, other = _file_target(output, settings, opts)
    check_writable(output, group)
    remove_leftovers(output, group)
    parts = parts_dir(output, group)
    if opts.overwrite:
        shutil.rmtree(parts, ignore_errors=True)
    manifest = _read_manifest(parts)
    if manifest is not None and manifest != settings:
        raise CacheError(f"{parts} holds an unfinished run with different settings ("
                         + "; ".join(settings_difference(manifest, settings))
                         + "): use --overwrite to discard it, or rerun with its settings")
    if other is not None and manifest is None:  # (an unfinished --overwrite goes on)
        raise CacheError(f"{output} was written with different settings ("
                         + "; ".join(settings_difference(other, settings)) + "): use "
                         "--overwrite to replace it, or choose another output")
    shards = [read_index(s) for s in reversed(list_shards(parts))] if parts.is_dir() else []
    plan = plan_update(images.paths, shards + ([old] if old else []),
                       output=None if opts.add else old, extra_failed=images.skipped,
                       verify=opts.verify, retry_failed=opts.retry_failed)
    plan.add, plan.kept, plan.group = opts.add, old if opts.add else None, group
    if not shards and (_nothing_added(plan, old) if opts.add
                       else _same_file(plan, old, images)):
        shutil.rmtree(parts, ignore_errors=True)
        return _Opened(output, group, None)
    if len(plan.compute) and manifest is None:
        try:
            parts.mkdir(exist_ok=True)
            write_json_atomic(parts / MANIFEST, settings)
        except OSError as err:
            raise io_error(err, "start the run in") from err
    return _Opened(output, group, plan)


def _file_target(output: Path, settings: dict, opts: ExtractOptions
                 ) -> tuple[str, Index | None, dict | None]:
    """The group a run writes, its entries to reuse (None: none) and, when the root holds
    other settings that this run would replace, those settings.

    A run writes the root, reusing a named group of its settings (a cache's) if the root has
    none; with ``add``, it writes the group of its settings wherever it is, or a new one."""
    if not output.exists() or (opts.overwrite and not opts.add):
        return "/", None, None
    try:
        f = open_features(output)
    except CacheError as err:  # it names the file and what is wrong with it
        raise CacheError(f"{err}; use --overwrite to replace it") from err
    with f:
        if not descriptor_groups(f):
            raise CacheError(f"{output} is not a vggfeat feature file (no 'features'/'paths'); "
                             "use --overwrite to replace it, or choose another output")
        found = file_group(f, settings)
        old = index_of(f, output, found) if found else None
        if opts.add:
            return found or new_group(f, settings), old, None
        root = settings_of(f.attrs) if "features" in f else None
        return "/", old, root if root is not None and found != "/" else None


@dataclass
class StoreUpdate:
    """What an update of a store covers: this process's units whose fingerprint changed (their
    images), the store's state when planned, and what the update's entry records."""

    images: ImageList           # the images of the changed units, in input order
    ids: FileIds                # their stat, taken once for the units' fingerprints
    state: object               # vggfeat.cache.sharded.State
    scope: set[str]             # the paths whose entries the update may change
    units: dict[str, str]       # unit id → fingerprint, recorded with the rows
    keep_units: list[str] | None
    compact: bool               # compaction may run (no other process writes the store)
    skipped_rows: int = 0       # rows of this process's unchanged units (reused as they are)


def _open_store(store: Path, images: ImageList, settings: dict, opts: ExtractOptions,
                lock: OutputLock | None, share: WorkShare = WorkShare(), first: bool = True,
                alone: bool = True) -> _Opened:
    """Check the store's settings and plan this process's share of the update; None: up to
    date.  The same planning as a file's, over the images of this process's units that changed
    (see vggfeat.data.units), against the store's live shards and a killed run's unlisted ones;
    the first process also drops the rows of images that are no longer inputs.  With ``add``,
    a setting the store does not hold goes to its sub-store ``alt/NAME`` (under the lock)."""
    _check_store_writable(store)
    if lock is not None:
        lock.acquire()
    output, store = store, store_for(store, settings) if opts.add else store
    if store != output:
        _mkdir(output / ALT)
    remove_stale_temporaries(store)
    _open_settings(store, settings)
    _mkdir(store / SHARDS)
    units = file_units(images, opts.unit_images)
    mine = _my_units(units, share, opts.only_units)
    my_paths = _unit_paths(images, mine)
    with ThreadPoolExecutor(1) as pool:  # the inputs are statted while the index is read
        stat = pool.submit(stat_files, my_paths)
        state = read_state(store)
        update = _changed_units(images, units, mine, stat.result(), state, opts, first, alone)
    skipped = set(my_paths) - update.scope
    sources = [] if opts.overwrite else planning_sources(state, unlisted_shards(store, state))
    plan = plan_update(update.images.paths, sources, now=update.ids,
                       located=locate_inputs(update.images.paths, state, sources) if sources
                       else None,
                       extra_failed=images.skipped if first else [], verify=opts.verify,
                       retry_failed=opts.retry_failed)
    plan.add = opts.add
    update.skipped_rows = sum(map(skipped.__contains__, state.live_row_paths()))
    if first:
        gone = _removed_paths(state, images)
        update.scope |= gone | {p for p, _ in images.skipped}
        plan.removed = len(gone)
    if (not len(plan.compute)
            and plan_changes(plan, state, update.images, update.scope).nothing_to_do(state)
            and all(state.units.get(k) == v for k, v in update.units.items())
            and (update.keep_units is None or set(state.units) <= set(update.keep_units))):
        return _Opened(store, "/", None)
    plan.store_state = update  # its state is reused at the end unless another writer published
    return _Opened(store, "/", plan)


def _open_settings(store: Path, settings: dict) -> None:
    """Create the store with ``settings``, or check that it holds them (several processes may
    create it at once: the first settings file published wins, the others compare)."""
    stored = read_settings(store)
    if stored is None:
        if any(n not in (SHARDS, INDEX, SETTINGS, ALT) and not n.startswith(".")
               for n in listing(store)):
            raise CacheError(f"{store} is a folder that is not a vggfeat feature store (no "
                             f"{SETTINGS}) and is not empty: choose a new or empty folder")
        _mkdir(store)
        write_settings(store, settings)
        stored = read_settings(store) or {}
    if {k: stored.get(k) for k in DESCRIPTOR_SETTINGS} != settings:
        raise CacheError(f"feature store {store} holds descriptors of other settings ("
                         + "; ".join(settings_difference(stored, settings)) + "): a store keeps "
                         "one setting; choose another store (or delete this one)")


def _changed_units(images: ImageList, units: list[Unit], mine: list[Unit], ids: FileIds, state,
                   opts: ExtractOptions, first: bool, alone: bool) -> StoreUpdate:
    """This process's units (``mine`` of ``units``, their images' stat ``ids``) whose
    fingerprint differs from the one the store records."""
    fingerprints = _fingerprints(images, mine, ids)
    redo = opts.overwrite or opts.retry_failed or opts.verify or opts.add
    stat_at = np.cumsum([0] + [u.stop - u.start for u in mine])  # each unit's stat, in ids
    changed = [(u, lo) for u, lo in zip(mine, stat_at)
               if redo or state.units.get(u.id) != fingerprints[u.id]]
    if opts.add:  # an addition's listing is not the store's: its units are not the store's
        fingerprints = {}
    subset = ImageList(
        _unit_paths(images, [u for u, _ in changed]),
        None if images.labels is None else list(chain.from_iterable(
            images.labels[u.start:u.stop] for u, _ in changed)),
        images.class_names, images.sources)
    taken = np.concatenate([np.arange(lo, lo + u.stop - u.start) for u, lo in changed]
                           or [np.empty(0, np.int64)])
    return StoreUpdate(subset, ids.take(taken), state, set(subset.paths), fingerprints,
                       [u.id for u in units] if first else None, alone)


def _my_units(units: list[Unit], share: WorkShare, only: tuple[str, ...] | None) -> list[Unit]:
    if only is None:
        return share.mine(units)
    known = {u.id for u in units}
    unknown = [k for k in only if k not in known]
    if unknown:
        raise ConfigError(f"unit {unknown[0]!r} is not a unit of these inputs (they have "
                          f"{len(units)} units: {units[0].id if units else '-'} …)")
    return [u for u in units if u.id in set(only)]


def plan_units(images: ImageList | list[str], store: str | os.PathLike,
               unit_images: int = UNIT_IMAGES, *, image_column: str | None = None,
               label_column: str | None = None) -> tuple[list[str], list[str]]:
    """(every unit id of the inputs, the ids whose fingerprint differs from what ``store``
    records: the units an engine must hand out).  ``images``: a listing, or inputs given as to
    :func:`extract` (tars and Parquet files are units of their own)."""
    store = locate(store)
    recorded = read_state(store).units if location.exists(store / SETTINGS) else {}
    if not isinstance(images, ImageList) and any(is_stream_input(str(i)) for i in images):
        found = stream_inputs([str(i) for i in images], image_column=image_column,
                              label_column=label_column)
        return ([u.id for u in found.units],
                [u.id for u in found.units if recorded.get(u.id) != found.fingerprint(u)])
    if not isinstance(images, ImageList):
        images = gather_images(list(images))
    units = file_units(images, unit_images)
    fingerprints = _fingerprints(images, units, stat_files(_unit_paths(images, units)))
    return [u.id for u in units], [u.id for u in units if recorded.get(u.id) != fingerprints[u.id]]


def _unit_paths(images: ImageList, units: list[Unit]) -> list[str]:
    return list(chain.from_iterable(images.paths[u.start:u.stop] for u in units))


def _fingerprints(images: ImageList, units: list[Unit], ids: FileIds) -> dict[str, str]:
    """Each unit's fingerprint, from ``ids``, the stat of its images (a HEAD of its URLs) in
    the units' order."""
    fingerprints, at = {}, 0
    for u in units:
        n = u.stop - u.start
        fingerprints[u.id] = files_fingerprint(images, u, ids.size[at:at + n],
                                               ids.mtime_ns[at:at + n])
        at += n
    return fingerprints


def _roles(output: Where, share: WorkShare, opts: ExtractOptions
           ) -> tuple[bool, bool, OutputLock | None]:
    """(alone, first, lock) of this process.  An engine's worker (only_units) writes beside
    others, as a share does; only a lone process (or an addition, which waits its turn) locks
    the output and compacts it, and only the first share drops the rows of images that are no
    longer inputs."""
    worker = bool(opts.only_units)
    alone = share.count == 1 and not worker and _lockable(output)
    first = share.first and not worker and not opts.add
    return alone, first, OutputLock(output, wait=opts.add) if alone else None


def _lockable(output: Where) -> bool:
    """Whether a lone run locks ``output`` and compacts it.  Not a store in a bucket: a local
    flock says nothing to other machines, and none is needed (writers publish beside one
    another); compaction deletes shards a concurrent writer may still read, so there it runs
    only when asked (``vggfeat store compact URL``, while no writer runs)."""
    return not is_remote(output)


def _check_store_writable(store: Where) -> None:
    if is_remote(store):
        check_reachable(store)
    else:
        check_writable(store)


def _mkdir(folder: Where) -> None:
    if is_remote(folder):  # (a bucket's folders are prefixes of names: nothing to create)
        return
    try:
        folder.mkdir(exist_ok=True)
    except OSError as err:
        raise io_error(err, "create", folder) from err
    if folder.is_symlink():
        raise CacheError(f"{folder} is a symbolic link, which vggfeat never follows: remove it")


def _removed_paths(state, images: ImageList) -> set[str]:
    """Paths with a live entry in the store that are no longer inputs."""
    return set(state.live.where).difference(images.paths, (p for p, _ in images.skipped))


def _finish_store(plan: Plan, known: set[Path], store: Path, images: ImageList, settings: dict,
                  model: VGG, dim: int, n_scales: int, dtype: str) -> int:
    """Publish the update: one index entry adding the new shards and removing what changed or
    went; every file of unchanged rows is left untouched.  The number of new rows."""
    update: StoreUpdate = plan.store_state
    images = update.images
    plan.attach([read_index(s) for s in list_shards(store / SHARDS) if s not in known])
    missing = len(plan.compute)
    if missing:
        raise CacheError(f"cannot finish {store}: {missing} of {len(images)} images are not "
                         "computed yet; run the same command again to complete it")
    state = update.state if current(update.state) else read_state(store)
    changes = plan_changes(plan, state, images, update.scope)
    if (not changes.nothing_to_do(state) or update.keep_units is not None
            or any(state.units.get(k) != v for k, v in update.units.items())):
        entry = publish_update(store, state, plan, changes, images, dim=dim, n_scales=n_scales,
                               dtype=dtype, writer=_file_attrs(settings, model),
                               units=update.units, keep_units=update.keep_units)
        if update.compact:
            after_update(store, state, entry)
    return int(np.count_nonzero(plan.is_row())) - plan.reused


def _read_manifest(parts: Path) -> dict | None:
    try:
        return {k: v for k, v in json.loads((parts / MANIFEST).read_text()).items()
                if k in DESCRIPTOR_SETTINGS}
    except (FileNotFoundError, ValueError):
        return None


def _same_file(plan: Plan, old: Index | None, images: ImageList) -> bool:
    """True when writing ``plan`` would give ``old`` (the root) again: nothing to do."""
    if old is None or old.group != "/" or len(plan.compute) or plan.removed:
        return False
    rows, rows_at, failed_paths, reasons, failed_ids = plan.output()
    if not np.array_equal(rows.row, np.arange(old.n_rows)) or reasons != old.reasons:
        return False
    ids = FileIds.concat([plan.ids.take(rows_at), failed_ids])
    if (old.paths != [images.paths[i] for i in rows_at] + failed_paths
            or any(not np.array_equal(getattr(ids, k), getattr(old.ids, k))
                   for k in ("size", "mtime_ns", "sha256"))):
        return False
    with h5py.File(old.file, "r") as f:
        labels = f["labels"][:].tolist() if "labels" in f else None
        names = [n.decode() for n in f["class_names"][:]] if "class_names" in f else None
    wanted = None if images.labels is None else [images.labels[i] for i in rows_at]
    return labels == wanted and names == images.class_names


def _nothing_added(plan: Plan, old: Index | None) -> bool:
    """True when adding ``plan``'s inputs to ``old`` would give ``old`` again: each input has
    its entry there, with the same file identity."""
    if old is None or len(plan.compute) or plan.extra_failed:
        return False
    k = next(k for k, s in enumerate(plan.sources) if s is old)
    return bool((plan.source == k).all()) and all(
        np.array_equal(getattr(plan.ids, a), getattr(old.ids, a)[plan.entry])
        for a in ("size", "mtime_ns", "sha256"))


class _IdentifiedImages(PreparedImages):
    """Items also carry the file's (size, mtime_ns, sha256), taken before it is decoded.

    Only regular files are read: a FIFO, a device or a socket named like an image would block
    the run forever or never end; it is recorded as a failure with its reason instead."""

    def __getitem__(self, i: int):
        index = int(self.indices[i])
        if is_url(self.paths[index]):
            return self._remote(index)
        identity = file_identity(self.paths[index])
        kind = _special_file(self.paths[index])
        if kind is not None:
            return index, None, f"not a regular file ({kind}): only image files are read", identity
        return (*super().__getitem__(i), identity)


    def _remote(self, index: int):
        """A URL's item: its metadata first (the identity a rerun compares, as a file's stat),
        then its bytes, downloaded once and hashed."""
        url = self.paths[index]
        if getattr(self, "_fetcher", None) is None:
            self._fetcher = Fetcher()  # one per worker process: it pools connections
        found = url_stat(url, self._fetcher)
        sample = self._fetcher.fetch_one(url)
        # Without metadata that proves it unchanged the row records (size, -1), which no stat
        # of the URL gives back (it gives size −1 then): a rerun downloads it again.
        identity = ((MISSING, 0, bytes(32)) if sample.data is None else
                    (*(found or (sample.size, -1)), sample.sha256))
        if sample.data is None:
            return index, None, sample.reason, identity
        try:
            return index, self.prepare(decode_image(sample.data)), None, identity
        except BadImage as err:
            return index, None, str(err), identity


def _special_file(path: str) -> str | None:
    """What ``path`` is when it exists and is not a regular file (a link's target counts)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None  # missing or unreadable: the decoder says which
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return None


def _compute(net: DescriptorNet, images: ImageList, mine: np.ndarray, parts: Path,
             dist: Distributed, opts: ExtractOptions, dtype: str, labelled: bool = False) -> None:
    """Compute this rank's share, publishing shards into ``parts`` as it goes; SIGTERM and
    errors flush.  ``labelled``: shards keep each row's class name (a store's do)."""
    if not len(mine):  # (an update that only drops rows; or more ranks than images)
        return
    spec = net.spec
    buffer = _ShardBuffer(parts, dist.rank, images.paths, net.dim, len(spec.scales),
                          dtype, opts.shard_images, opts.shard_seconds,
                          input_labels(images) if labelled else None)
    loader = image_loader(images.paths, mine, partial(prepare, spec=spec),
                          batch_size=opts.batch_size,
                          workers=default_workers() if opts.workers is None else opts.workers,
                          pin_memory=dist.device.type == "cuda", items=_IdentifiedImages)
    bar = image_bar(len(mine), disable=not (opts.progress and dist.is_main),
                    desc=f"extract {spec.layer}" + (f" rank 0/{dist.world_size}"
                                                     if dist.world_size > 1 else ""))
    failures = 0
    # Same-shape images run together across batches.  Finished images are published whatever
    # their order (shards need none), so a kill loses at most --shard-size finished images.
    stream = net.stream(on_progress=bar.update)
    try:
        with _sigterm_unwinds():
            for done, unread in stream.run_loader(loader, unpack=_stream_entry,
                                                  out_of_order=True):
                for index, _, reason, identity in unread:
                    failures += 1
                    if opts.strict:
                        raise ExtractError(f"{images.paths[index]}: {reason} (--strict stops at "
                                           "the first bad image; without it, bad images are "
                                           "recorded and skipped)")
                    buffer.add_failure(index, reason, identity)
                _hand_over(done, net, buffer)
                buffer.maybe_flush()
                bar.set_postfix(failed=failures, refresh=False)
    finally:
        # Whatever was computed is kept, even when stopping on an error: images finished behind
        # one still waiting for its pass too.
        try:
            _hand_over(stream.take(out_of_order=True), net, buffer)
        finally:
            buffer.flush()
            bar.close()


def _stream_entry(item: tuple) -> tuple[tuple, list]:
    """A decoded loader item → (key kept with its results, views) for the stream."""
    index, views, _, identity = item
    return (index, identity, [v.shape[-2:] for v in views]), views


NON_FINITE = ("non-finite descriptor (NaN or infinity): the weights or this image give no "
              "usable values; check the weights")


def _hand_over(done: list, net: DescriptorNet, buffer: _ShardBuffer) -> None:
    """Rows of finished images ``(index, identity, sizes), results`` into ``buffer``; a row
    that is not finite is recorded as a failure, never stored."""
    if not done:
        return
    rows = net.rows([results for _, results in done]).numpy()
    finite = np.isfinite(rows).all(axis=1)
    good = np.flatnonzero(finite)
    if len(good):
        buffer.add([done[k][0][:2] for k in good], rows[good],
                   np.array([done[k][0][2] for k in good]))
    for k in np.flatnonzero(~finite):
        index, identity, _ = done[k][0]
        buffer.add_failure(index, NON_FINITE, identity)


@contextmanager
def _sigterm_unwinds():
    """SIGTERM (what torchrun and job schedulers send) unwinds like Ctrl-C, so rows not yet
    published are flushed before the process ends, with exit status 143."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _ShardBuffer:
    """Rows waiting to be published; flushed by count or by age so little is ever at risk."""

    def __init__(self, parts: Path, rank: int, paths: list[str], dim: int, n_scales: int,
                 dtype: str, max_images: int, max_seconds: float,
                 labels: list[str] | None = None) -> None:
        self.parts, self.rank, self.paths, self.dtype = parts, rank, paths, dtype
        self.labels = labels
        self.dim, self.n_scales = dim, n_scales
        self.max_images, self.max_seconds = max_images, max_seconds
        self._reset()

    def _reset(self) -> None:
        self.good, self.rows, self.sizes, self.failed = [], [], [], []
        self.started = time.monotonic()

    def add(self, items: list[tuple[int, tuple]], rows: np.ndarray, sizes: np.ndarray) -> None:
        self.good.extend(items)
        self.rows.append(rows)
        self.sizes.append(sizes)

    def add_failure(self, index: int, reason: str, identity: tuple) -> None:
        self.failed.append((index, identity, reason))

    def maybe_flush(self) -> None:
        pending = len(self.good) + len(self.failed)
        if pending >= self.max_images or (pending and time.monotonic() - self.started
                                          >= self.max_seconds):
            self.flush()

    def flush(self) -> None:
        if not self.good and not self.failed:
            return
        first = min(i for i, *_ in self.good + self.failed)
        write_shard(self.parts, f"shard-r{self.rank:03d}-{first:010d}-{uuid.uuid4().hex[:8]}.h5",
                    paths=[self.paths[i] for i, _ in self.good],
                    ids=FileIds.of([x for _, x in self.good]),
                    features=(np.concatenate(self.rows) if self.rows
                              else np.empty((0, self.dim))),
                    input_sizes=(np.concatenate(self.sizes) if self.sizes
                                 else np.empty((0, self.n_scales, 2))),
                    failed_paths=[self.paths[i] for i, _, _ in self.failed],
                    failed_reasons=[r for _, _, r in self.failed],
                    failed_ids=FileIds.of([x for _, x, _ in self.failed]),
                    dtype=self.dtype,
                    label_names=(None if self.labels is None
                                 else [self.labels[i] for i, _ in self.good]))
        self._reset()


def _finish(plan: Plan, known: set[Path], output: Path, images: ImageList, settings: dict,
            model: VGG, dim: int, n_scales: int, dtype: str) -> int:
    """Join reused and new rows into ``output``'s group in input order (after the entries it
    keeps, when adding), every other setting of the file kept; then drop the parts folder.
    The number of new rows."""
    parts = parts_dir(output, plan.group)
    plan.attach([read_index(s) for s in list_shards(parts) if s not in known])
    missing = len(plan.compute)
    if missing:
        raise CacheError(f"cannot finish {output}: {missing} of {len(images)} images are not "
                         "computed yet; run the same command again to complete it")
    class_names = images.class_names
    if plan.add:
        out, class_names = _added(plan, output)
    else:
        out = Output.of(plan, images.labels)
    write_features(output, out.rows, paths=out.paths, ids=out.ids, labels=out.labels,
                   class_names=class_names, failed_paths=out.failed_paths,
                   failed_reasons=out.failed_reasons, failed_ids=out.failed_ids,
                   attrs=_file_attrs(settings, model), dim=dim, n_scales=n_scales,
                   dtype=dtype, group=plan.group, keep_others=True)
    shutil.rmtree(parts, ignore_errors=True)
    return int(np.count_nonzero(plan.is_row())) - plan.reused


def _added(plan: Plan, output: Path) -> tuple[Output, list[str] | None]:
    """The group after adding the inputs to what it holds (``plan.kept``), and its class
    names: kept rows keep their labels; an input's row keeps its label when reused from the
    group, and gets −1 (no class) when computed."""
    kept = plan.kept
    if kept is None:
        return Output.of(plan, None), None
    with h5py.File(output, "r") as f:  # the version planned: we hold the lock since
        g = f[kept.group]
        labels = g["labels"][:] if "labels" in g else None
        names = [n.decode() for n in g["class_names"][:]] if "class_names" in g else None
    mine = None
    if labels is not None:
        k = next(k for k, s in enumerate(plan.sources) if s is kept)
        good = (plan.source == k) & (plan.entry < kept.n_rows)
        mine = np.full(len(plan.paths), -1, np.int64)
        mine[good] = labels[plan.entry[good]]
    inputs = set(plan.paths) | {p for p, _ in plan.extra_failed}
    return Output.of(plan, mine).after(kept, labels, inputs), names


def _file_attrs(settings: dict, model: VGG) -> dict:
    return {**settings, "weights_source": model.weights_meta.get("source", "random"),
            "vggfeat_version": __version__, "torch_version": str(torch.__version__),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": True}


def _attrs(output: Where, group: str = "/") -> dict:
    return (store_attrs(output) if is_remote(output) or output.is_dir()
            else read_attrs(output, group=group))


def _failures(output: Path, group: str = "/") -> list[tuple[str, str]]:
    with h5py.File(output, "r") as f:
        g = f[group]
        return list(zip((p.decode() for p in g["failed/paths"][:]),
                        (r.decode() for r in g["failed/reasons"][:])))
