"""``vggfeat extract --engine ray``: a store's units of work computed by the actors of a Ray cluster.

The driver lists the inputs once and plans which units changed (:func:`plan_units`); their ids
flow through a Ray Data pipeline (``from_items`` → ``map_batches`` over an actor pool).  Each
actor builds the net once, then computes one unit per call with ``extract(…,
only_units=(id,))``, which publishes the unit's shards and index entry into the store itself:
only a status row per unit comes back.  At the end the driver drops the rows of images that are
no longer inputs and records the unit list (``extract(…, only_units=())``).

Ray restarts an actor whose process died (a crash, the OOM killer, a lost node) and gives its
unit to it again; a unit that killed its worker :data:`~vggfeat.choices.RAY_UNIT_TRIES` times is
reported instead.  The store must be a folder every node reaches under the same path, and every
node needs vggfeat, the inputs and the weights (a weights file at the same path, or a hub's
weights in each node's cache): docs/scale.md.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from ..choices import DTYPES, RAY_UNIT_TRIES
from ..errors import ConfigError, ExtractError, MissingDependencyError
from ..optional import require

# One row per unit: what its worker did.  ``error`` is empty when the unit was published.
STATUS = ("unit", "computed", "failed", "seconds", "images_per_forward", "backend", "error")


@dataclass(frozen=True)
class _Job:
    """What every actor needs, put once into Ray's object store."""

    images: object           # ImageList: the driver's listing (units are positions in it)
    store: Path
    spec: object             # DescriptorSpec
    model: object | None     # a VGG to pickle, or None: built from arch and weights
    arch: str | None
    weights: str | None
    dtype: str
    options: object          # ExtractOptions of the workers


def extract_with_ray(inputs, output, *, spec=None, model=None, arch: str | None = None,
                     weights: str | None = "torchvision", dtype: str = "float32", options=None,
                     address: str | None = None, actors: tuple[int, int] | None = None,
                     gpus_per_actor: float | None = None, cpus_per_actor: float | None = None,
                     **option_values):
    """:func:`vggfeat.extract` into a feature store, its changed units computed by Ray actors.

    Takes :func:`~vggfeat.descriptors.extract`'s arguments and returns its
    :class:`~vggfeat.descriptors.ExtractResult`; ``output`` must be a store (a folder).

    Args:
        address: the Ray cluster (``auto``, ``HOST:PORT``, ``ray://HOST:10001``); default: the
            one this process is connected to, else a new local one for this call.
        actors: (least, most) actors of the pool [default: 1 to one per GPU, or on a cluster
            without GPUs one per node]; never more than units to compute.
        gpus_per_actor: GPUs each actor takes (0.5 puts two on a GPU) [default: 1 when the
            cluster has GPUs and ``device`` is not ``cpu``, else 0].
        cpus_per_actor: CPUs each actor reserves, and torch's threads in it [default: 1 with
            GPUs, else a node's CPUs]; decoding workers (``workers``) come on top.
    """
    from ..descriptors import DescriptorSpec, ExtractOptions
    from ..descriptors.run import described_model, plan_units

    opts = replace(options or ExtractOptions(), **option_values)
    spec = spec or DescriptorSpec()
    start, output = time.monotonic(), Path(output)
    _check_request(output, opts, dtype)
    ray = _import_ray()
    images = _listing(inputs)
    described = model if model is not None else described_model(arch, weights, opts.download)
    _open_settings(output, described, spec, dtype)  # a store of other settings: refused now
    every, changed = plan_units(images, output, opts.unit_images,
                                image_column=opts.image_column, label_column=opts.label_column)
    redo = opts.overwrite or opts.verify or opts.retry_failed  # they look inside every unit
    todo = every if redo else changed
    rows = []
    if todo:
        job = _Job(images, output, spec, model, arch, weights, dtype,
                   replace(opts, progress=False, num_shards=None, shard_index=None))
        with _session(ray, address):
            pool = _pool_size(ray, opts, len(todo), actors, gpus_per_actor, cpus_per_actor)
            rows = _run_units(ray, job, todo, pool, progress=opts.progress)
    final = _finish(images, output, described, spec, dtype, opts)
    _raise_failed_units(rows, output)
    return _result(final, rows, time.monotonic() - start)


def _import_ray():
    ray = require("ray", "ray", "--engine ray")
    try:
        import ray.data  # noqa: F401  (Ray Data needs pyarrow and pandas beside Ray)
    except ImportError as err:
        raise MissingDependencyError(f"--engine ray needs Ray Data ({err}): pip install "
                                     "\"vggfeat[ray]\" (or pip install \"ray[data]\")") from err
    return ray


def _check_request(output: Path, opts, dtype: str) -> None:
    from ..cache.sharded import is_store

    if dtype not in DTYPES:  # (before the store's settings are written with it)
        raise ConfigError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if not is_store(output):
        raise ConfigError(f"--engine ray writes a feature store (a folder), which its actors "
                          f"share; {output} is one file: write to a store (e.g. -o "
                          f"{output.with_suffix('').name}) and export it with vggfeat store "
                          "export when done")
    if opts.num_shards is not None or opts.shard_index is not None or opts.only_units:
        raise ConfigError("--engine ray hands out every unit itself: drop --num-shards/"
                          "--shard-index (they split the work between processes you start)")


def _listing(inputs):
    """What every actor receives: a listing of files and URLs, made once here (their unit ids
    are positions in it), or tars and Parquet files as given (each is its own unit)."""
    from ..data.sources import ImageList, gather_images
    from ..data.streams import is_stream_input

    if isinstance(inputs, ImageList):
        return inputs
    if any(is_stream_input(str(i)) for i in inputs):
        return [str(i) for i in inputs]
    return gather_images(list(inputs))


def _open_settings(store: Path, model, spec, dtype: str) -> None:
    from ..cache.store import check_writable
    from ..descriptors.run import _open_settings as open_settings
    from ..descriptors.run import descriptor_settings

    check_writable(store)
    open_settings(store, descriptor_settings(model, spec, dtype))


@contextmanager
def _session(ray, address: str | None):
    """The Ray cluster this process is connected to; else connect to ``address``, or start a
    local one, for this run only."""
    if ray.is_initialized():
        yield
        return
    ray.init(address=address, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class _Pool:
    least: int
    most: int
    gpus: float
    cpus: float


def _pool_size(ray, opts, n_units: int, actors, gpus_per_actor, cpus_per_actor) -> _Pool:
    """How many actors, and what each reserves (see :func:`extract_with_ray`)."""
    resources = ray.cluster_resources()
    cluster_gpus = resources.get("GPU", 0)
    on_cpu = (opts.device or "").startswith("cpu")
    gpus = gpus_per_actor if gpus_per_actor is not None else (
        1 if cluster_gpus and not on_cpu else 0)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    cpus = cpus_per_actor or (1 if gpus else min(
        (r["CPU"] for r in nodes if r.get("CPU")), default=1))
    if actors is None:
        actors = (1, max(1, math.floor(cluster_gpus / gpus) if gpus else len(nodes)))
    least, most = actors
    if not 1 <= least <= most:
        raise ConfigError(f"--actors {least}:{most}: give 1 ≤ MIN ≤ MAX")
    if gpus and gpus > cluster_gpus:
        raise ConfigError(f"--gpus-per-actor {gpus:g}: the Ray cluster has {cluster_gpus:g} "
                          "GPUs; give fewer (or --device cpu)")
    return _Pool(min(least, n_units), min(most, n_units), gpus, cpus)


def _run_units(ray, job: _Job, todo: list[str], pool: _Pool, progress: bool) -> list[dict]:
    """Stream ``todo`` through the actor pool; a status row per unit, as they finish."""
    from ray.data import ActorPoolStrategy

    from ..progress import image_bar

    sizes = _unit_sizes(job)
    attempts = _attempts_actor(ray)
    bar = image_bar(sum(sizes[u] for u in todo), disable=not progress,
                    desc=f"extract {job.spec.layer} (ray)")
    rows = []
    try:
        with _one_bar():  # (a dataset keeps the settings of its creation)
            units = ray.data.from_items([{"unit": u} for u in todo]).map_batches(
                UnitWorker, batch_size=1, num_cpus=pool.cpus, num_gpus=pool.gpus,
                compute=ActorPoolStrategy(min_size=pool.least, max_size=pool.most),
                fn_constructor_kwargs={"job": [ray.put(job)], "attempts": attempts})
            for row in units.iter_rows():
                rows.append({k: row[k] for k in STATUS})
                bar.update(sizes[row["unit"]])
                bar.set_postfix(units=f"{len(rows)}/{len(todo)}", refresh=False)
    finally:
        bar.close()
        ray.kill(attempts)
    return rows


def _unit_sizes(job: _Job) -> dict[str, int]:
    """Images per unit of a listing; a tar's or row group's count is not known before reading
    it, so those count 1 (the bar then counts units)."""
    from ..data.sources import ImageList
    from ..data.units import file_units

    if not isinstance(job.images, ImageList):
        return defaultdict(lambda: 1)
    return {u.id: u.stop - u.start for u in file_units(job.images, job.options.unit_images)}


def _owned(job: _Job, unit: str):
    """Whether a stored path belongs to ``unit``."""
    from ..data.sources import ImageList
    from ..data.units import file_units

    if not isinstance(job.images, ImageList):
        source = unit.split(":", 1)[1].rsplit("#", 1)[0] if unit.startswith("parquet:") \
            else unit.split(":", 1)[1]
        return lambda path: path.startswith(source + "#")
    u = next(u for u in file_units(job.images, job.options.unit_images) if u.id == unit)
    mine = set(job.images.paths[u.start:u.stop])
    return mine.__contains__


@contextmanager
def _one_bar():
    """Ray Data's progress bars and its notes on starting and ending a run are off while the
    run shows its own bar; its warnings (e.g. resources the cluster lacks) still show."""
    from ray.data import DataContext

    context = DataContext.get_current()
    loggers = {logging.getLogger(name): level for name, level in (
        ("ray.data._internal.progress", logging.ERROR),  # "progress bars disabled"
        ("ray.data._internal.execution.streaming_executor", logging.WARNING))}
    before = context.enable_progress_bars, {log: log.level for log in loggers}
    context.enable_progress_bars = False
    for log, level in loggers.items():
        log.setLevel(level)
    try:
        yield
    finally:
        context.enable_progress_bars = before[0]
        for log, level in before[1].items():
            log.setLevel(level)


def _attempts_actor(ray):
    """A counter of each unit's tries, shared by the actors: Ray would give a unit that kills
    its worker every time (a crash, an image that exhausts memory) to the restarted worker
    forever."""

    @ray.remote(num_cpus=0)
    class Attempts:
        def __init__(self) -> None:
            self.tries: dict[str, int] = {}

        def start(self, unit: str) -> int:
            self.tries[unit] = self.tries.get(unit, 0) + 1
            return self.tries[unit]

    return Attempts.remote()


class UnitWorker:
    """An actor of the pool: builds the net once, then computes one unit per call, publishing
    it into the store; returns :data:`STATUS` rows.  An error is reported in its unit's row (the
    other units go on); a net that cannot be built is reported by every unit."""

    def __init__(self, job: list, attempts) -> None:
        import ray

        self.job: _Job = ray.get(job[0])  # (a list, so that Ray passes the reference as is)
        self.attempts, self.net, self.broken = attempts, None, ""
        try:
            self.net = self._build()
        except Exception as err:  # noqa: BLE001  (named in every unit's row, not a lost actor)
            self.broken = f"the worker on {os.uname().nodename} could not build the net: {err}"

    def _build(self):
        import torch

        from ..models.factory import vgg

        job = self.job
        if job.model is not None:
            return job.model
        # As extract builds its own net (eval, channels_last), so the runner need not copy it.
        return vgg(job.arch, weights=job.weights, download=job.options.download,
                   progress=False).eval().to(memory_format=torch.channels_last)

    def __call__(self, batch: dict) -> dict:
        rows = [self.unit(str(u)) for u in batch["unit"]]
        return {k: [r[k] for r in rows] for k in STATUS}

    def unit(self, unit: str) -> dict:
        import ray

        from ..descriptors.run import extract

        row = dict(unit=unit, computed=0, failed=0, seconds=0.0, images_per_forward=0.0,
                   backend="", error=self.broken)
        tries = ray.get(self.attempts.start.remote(unit))
        if tries > RAY_UNIT_TRIES:
            row["error"] = (f"its worker process died {tries - 1} times while computing it (a "
                            "crash or the out-of-memory killer: see the Ray workers' logs)")
        if row["error"]:
            return row
        job, began = self.job, time.monotonic()
        try:
            done = extract(job.images, job.store, spec=job.spec, model=self.net,
                           dtype=job.dtype, options=replace(job.options, only_units=(unit,)))
        except Exception as err:  # noqa: BLE001  (reported with its unit; the others go on)
            return {**row, "error": f"{type(err).__name__}: {err}"}
        mine = _owned(job, unit)
        return {**row, "computed": done.computed, "seconds": time.monotonic() - began,
                "failed": sum(mine(path) for path, _ in done.failed),
                "images_per_forward": done.images_per_forward, "backend": done.backend}


def _finish(images, store: Path, model, spec, dtype: str, opts):
    """The driver's step: drop the rows of images that are no longer inputs, record the unit
    list (and compact when due); nothing is computed, so the net may be a described one."""
    from ..descriptors.run import extract

    return extract(images, store, spec=spec, model=model, dtype=dtype,
                   options=replace(opts, only_units=(), num_shards=1, shard_index=0,
                                   overwrite=False, verify=False, retry_failed=False,
                                   progress=False))


def _raise_failed_units(rows: list[dict], store: Path) -> None:
    failed = [r for r in rows if r["error"]]
    if failed:
        first = failed[0]
        raise ExtractError(f"{len(failed)} of {len(rows)} units were not computed, e.g. "
                           f"{first['unit']}: {first['error']}; the others are published in "
                           f"{store}: fix the cause and run the same command again to compute "
                           "the rest")


def _result(final, rows: list[dict], seconds: float):
    """The run's :class:`ExtractResult`: the store's counts after the driver's step, with what
    the actors computed."""
    computed = sum(r["computed"] for r in rows)
    passes = sum(r["computed"] / r["images_per_forward"] for r in rows
                 if r["images_per_forward"])
    backends = sorted({r["backend"] for r in rows if r["backend"]})
    return replace(final, computed=computed, seconds=seconds,
                   up_to_date=final.up_to_date and not rows,
                   reused=final.num_images - computed,
                   images_per_forward=computed / passes if passes else 0.0,
                   backend="; ".join(backends))
