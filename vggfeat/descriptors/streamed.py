"""Extracting streamed inputs (WebDataset tars, Parquet row groups) into a feature store.

Each unit (vggfeat.data.streams) is read once, in a DataLoader worker that decodes its images
as they arrive; rows are published as one shard and one index entry per unit, recording the
unit's fingerprint, so a kill loses at most the units in flight and a rerun skips finished
units whose inputs are unchanged.  A row whose key and content hash are unchanged is reused
without running the net.  Processes share the units as in :func:`vggfeat.extract`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..cache import location
from ..cache.location import Where
from ..cache.sharded import (
    SHARDS,
    WRITER_KEYS,
    Entry,
    State,
    after_update,
    publish_entry,
    read_state,
    shard_name,
    sort_class_names,
)
from ..cache.store import FileIds, write_shard
from ..data.images import BadImage, decode_image
from ..data.loader import single_threaded_worker
from ..data.streams import StreamInputs, StreamUnit
from ..data.urls import Fetcher
from ..errors import InputError
from ..progress import image_bar
from .descriptor import DescriptorNet, prepare

END, REUSED = "\0end", "\0reused"


class _UnitSamples(IterableDataset):
    """Items ``((unit, n), views, reason, meta)`` of the units, worker ``w`` of ``W`` reading
    units ``w, w + W, …``; ``meta = (key, label, size, mtime_ns, sha256)``.  After a unit's
    last sample comes ``((unit, -1), None, END, error or None)``."""

    def __init__(self, inputs: StreamInputs, units: list[StreamUnit], spec,
                 reusable: dict[str, bytes]) -> None:
        self.inputs, self.units, self.spec, self.reusable = inputs, units, spec, reusable

    def __iter__(self):
        info = get_worker_info()
        w, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        fetcher = Fetcher()
        for pos in range(w, len(self.units), workers):
            error = None
            try:
                for n, sample in enumerate(self.inputs.samples(self.units[pos], fetcher)):
                    yield self._item(pos, n, sample)
            except InputError as err:  # a damaged tar: what was read is kept, the unit redone
                error = str(err)
            except Exception as err:  # noqa: BLE001  (a dropped connection, a bad row group…)
                error = f"{self.units[pos].source}: reading stopped ({type(err).__name__}: {err})"
            yield (pos, -1), None, END, error

    def _item(self, pos: int, n: int, sample):
        meta = (sample.key, sample.label, sample.size, sample.mtime_ns, sample.sha256)
        if sample.data is None:
            return (pos, n), None, sample.reason, meta
        if self.reusable.get(sample.key) == sample.sha256:
            return (pos, n), None, REUSED, meta
        try:
            return (pos, n), prepare(decode_image(sample.data), self.spec), None, meta
        except BadImage as err:
            return (pos, n), None, str(err), meta


@dataclass
class _UnitWork:
    """What one unit has produced so far."""

    rows: list = field(default_factory=list)       # (meta, sizes, results)
    failed: list = field(default_factory=list)     # (meta, reason)
    reused: list = field(default_factory=list)     # meta
    pending: int = 0
    ended: bool = False
    published: bool = False
    error: str | None = None


@dataclass
class StreamRun:
    """One process's run over its changed stream units."""

    store: Where
    inputs: StreamInputs
    units: list[StreamUnit]
    fingerprints: dict[str, str]
    net: DescriptorNet
    dtype: str
    writer: dict
    workers: int
    progress: bool = True
    computed: int = 0
    removed: int = 0  # rows of keys that the units no longer hold
    errors: list[str] = field(default_factory=list)

    def run(self, reusable: dict[str, bytes]) -> None:
        work = {pos: _UnitWork() for pos in range(len(self.units))}
        # One item at a time: a batch would hold a finished unit's end back until images of
        # the next unit arrive (which may be slow downloads), delaying its publication.
        loader = DataLoader(_UnitSamples(self.inputs, self.units, self.net.spec, reusable),
                            batch_size=None, num_workers=min(self.workers, len(self.units)),
                            worker_init_fn=single_threaded_worker)
        bar = image_bar(None, disable=not self.progress, desc=f"extract {self.net.spec.layer}")
        stream = self.net.stream(on_progress=bar.update)
        try:
            for done, failed in stream.run_loader(_sorted(loader, work), unpack=_unpack,
                                                  out_of_order=True):
                self._take(done, failed, work)
                if any(w.ended and w.pending and not w.published for w in work.values()):
                    # A unit's last images wait for their passes: run them now, so that the
                    # unit is published before the next unit's (maybe slow) images arrive.
                    stream.finish()
                    self._take(stream.take(out_of_order=True), [], work)
        finally:
            bar.close()

    def _take(self, done, failed, work: dict[int, _UnitWork]) -> None:
        for (pos, _, meta, sizes), results in done:
            work[pos].rows.append((meta, sizes, results))
            work[pos].pending -= 1
        for (pos, _), _, reason, meta in failed:
            work[pos].failed.append((meta, reason))
        for pos, unit_work in work.items():
            if unit_work.ended and unit_work.pending == 0 and not unit_work.published:
                self._publish(self.units[pos], unit_work)
                unit_work.published, unit_work.rows = True, []

    def _publish(self, unit: StreamUnit, work: _UnitWork) -> None:
        rows = (self.net.rows([r for _, _, r in work.rows]).numpy() if work.rows
                else np.empty((0, self.net.dim), np.float32))
        finite = np.isfinite(rows).all(axis=1)
        good = [m for m, ok in zip(work.rows, finite) if ok]
        failed = work.failed + [(m, "non-finite descriptor (NaN or infinity)")
                                for (m, _, _), ok in zip(work.rows, finite) if not ok]
        if work.error:  # recorded, so the store says what is wrong with this input
            failed.append(((f"{unit.source}#", None, -1, -1, bytes(32)), work.error))
        folder = self.store / SHARDS
        shard = write_shard(
            folder, shard_name("s"), paths=[m[0] for m, _, _ in good],
            ids=_ids([m for m, _, _ in good]), features=rows[finite],
            input_sizes=np.array([s for _, s, _ in good], np.int32).reshape(
                len(good), len(self.net.spec.scales), 2),
            failed_paths=[m[0] for m, _ in failed], failed_reasons=[r for _, r in failed],
            failed_ids=_ids([m for m, _ in failed]), dtype=self.dtype,
            label_names=[m[1] or "" for m, _, _ in good])
        self.computed += len(good)
        unlabelled = [m[0] for m, _, _ in good if not m[1]]
        if unlabelled and len(unlabelled) < len(good):
            warnings.warn(f"{unlabelled[0]} has no label ({len(unlabelled)} of the "
                          f"{len(good)} images of {unit.source} have none): their target is "
                          "-1; add a .cls (or a label column) to label them", UserWarning,
                          stacklevel=2)
        if work.error:
            self.errors.append(work.error)
        done = {} if work.error else {unit.id: self.fingerprints[unit.id]}
        labels = {m[1] for m, _, _ in good} | {m[1] for m in work.reused}
        seen = {m[0] for m, _, _ in work.rows} | {m[0] for m, _ in work.failed} | {
            m[0] for m in work.reused}
        # A unit read to its end replaces all its rows; one cut short (a damaged tar, a dropped
        # connection) only those it read again: the rows of the rest are kept until it reads.
        owns = ((lambda key: key in seen) if work.error
                else (lambda key: self.inputs.owns(unit, key)))
        state = read_state(self.store)
        entry = unit_entry(state, owns, shard, {m[0] for m in work.reused},
                           sorted(n for n in labels if n), done, self.writer)
        self.removed += _dropped(state, entry, seen)
        publish_entry(self.store, entry)


def _unpack(item):
    key, views, _, meta = item
    return (key[0], key[1], meta, [v.shape[-2:] for v in views]), views


def _sorted(loader, work: dict[int, _UnitWork]):
    """The loader's items as one-item batches, with its markers taken out (they mark the end of
    a unit and reused rows)."""
    for item in loader:
        (pos, _), views, reason, meta = item
        if reason == END:
            work[pos].ended, work[pos].error = True, meta
            yield []  # a turn for the caller to publish the unit before reading on
        elif reason == REUSED:
            work[pos].reused.append(meta)
        else:
            work[pos].pending += views is not None
            yield [item]


def _dropped(state: State, entry: Entry, seen: set[str]) -> int:
    """Rows ``entry`` removes whose key was not read again: images gone from their unit."""
    live = {s.name: s for s in state.shards}
    dead = [(live[n], e) for n, es in entry.removed.items() if n in live for e in es]
    dead += [(live[n], e) for n in entry.retired if n in live
             for e in np.flatnonzero(live[n].live)]
    return sum(e < s.index.n_rows and s.index.paths[e] not in seen for s, e in dead)


def _ids(metas) -> FileIds:
    """The identities of samples' ``meta`` (key, label, size, mtime_ns, sha256)."""
    return FileIds.of([m[2:] for m in metas])


def unit_entry(state: State, owns, shard: Where | None, reused: set[str], labels: list[str],
               units: dict[str, str], writer: dict | None, keep_units=None) -> Entry:
    """An index entry adding ``shard`` and removing every live entry whose key ``owns`` accepts,
    except the rows of the keys in ``reused`` (kept as they are)."""
    entry = Entry("", class_names=sort_class_names(set(state.class_names or ()) | set(labels)),
                  labelled=bool(labels) or state.class_names is not None,
                  writer=None if writer is None else {k: str(writer[k]) for k in WRITER_KEYS},
                  units=units, keep_units=keep_units)
    for s in state.shards:
        dead = [int(e) for e in np.flatnonzero(s.live) if owns(s.index.paths[e])
                and not (e < s.index.n_rows and s.index.paths[e] in reused)]
        if dead and len(dead) == np.count_nonzero(s.live):
            entry.retired.append(s.name)
        elif dead:
            entry.removed[s.name] = dead
    if shard is not None:
        with location.open_h5(shard) as f:
            entry.added[shard.name] = [len(f["paths"]), len(f["failed/paths"]),
                                       location.size(shard)]
    if not entry.class_names:
        entry.class_names, entry.labelled = None, False
    return entry


def drop_vanished(store: Where, inputs: StreamInputs, writer: dict | None,
                  alone: bool) -> int:
    """The first process's last step: remove entries of keys no current unit owns, and
    record the current units; the number of entries removed."""
    sources = inputs.sources()

    def gone(key: str) -> bool:
        return not any(key.startswith(s + "#") for s in sources)

    state = read_state(store)
    entry = unit_entry(state, gone, None, set(), [], {}, writer,
                       keep_units=[u.id for u in inputs.units])
    removed = sum(len(v) for v in entry.removed.values()) + sum(
        int(np.count_nonzero(s.live)) for s in state.shards if s.name in entry.retired)
    if removed or set(state.units) - set(entry.keep_units):
        publish_entry(store, entry)
        if alone:
            after_update(store, state, entry)
    return removed


