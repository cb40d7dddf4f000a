"""Reading a cache: the rows a feature file or store holds for some images, by path and file
identity, and which images are still to compute (what ``VGGFeatures(cache=…)`` reads).

The matching is :func:`~vggfeat.cache.update.plan_update`'s, with ``keep_deleted``: a deleted
image cannot have changed, so its row is still served.  Everything comes from one version: the
file's index and rows through one open (a writer publishes by renaming over the name, so the
open version stays whole), a store's from one replay of its index, each shard checked to be the
version listed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CacheError
from . import location
from .location import Where
from .rows import stat_key
from .settings import file_group, store_for
from .store import index_of, open_features
from .update import Plan, plan_update


@dataclass
class Found:
    """Rows (path → descriptor) and recorded failures (path → reason) of unchanged files, and
    the paths to compute."""

    rows: dict
    failed: dict
    todo: list[str]


class _Replaced(CacheError):
    """A shard listed by the replay was replaced meanwhile (a compaction retired it)."""


def lookup(cache: Where, settings: dict, paths: list[str], *, retry_failed: bool = False,
           store: bool = False) -> Found:
    """What ``cache`` (a ``.h5`` file, or a store when ``store``) holds of ``paths`` for
    ``settings``; a setting it does not hold leaves every path to compute."""
    if not store:
        return _lookup_file(cache, settings, paths, retry_failed)
    for attempt in range(3):
        try:
            return _lookup_store(store_for(cache, settings), settings, paths, retry_failed)
        except _Replaced:  # read the store's newer state
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _lookup_file(cache: Path, settings: dict, paths: list[str], retry_failed: bool) -> Found:
    if not cache.exists() and not cache.is_symlink():
        return Found({}, {}, list(paths))
    with open_features(cache) as f:
        group = file_group(f, settings)
        if group is None:
            return Found({}, {}, list(paths))
        index = index_of(f, cache, group)
        plan = plan_update(paths, [index], retry_failed=retry_failed, keep_deleted=True)
        return _found(plan, lambda k, e: _rows_of(f[group]["features"], e))


def _lookup_store(store: Where, settings: dict, paths: list[str], retry_failed: bool) -> Found:
    from .sharded import (
        SETTINGS,
        SHARDS,
        _regular,
        locate_inputs,
        planning_sources,
        read_state,
    )

    if not location.exists(store / SETTINGS):
        return Found({}, {}, list(paths))
    state = read_state(store)
    sources = planning_sources(state, [])
    plan = plan_update(paths, sources, retry_failed=retry_failed, keep_deleted=True,
                       located=locate_inputs(paths, state, sources))

    def read(k: int, entries: np.ndarray) -> np.ndarray:
        shard = state.shards[k]
        path = store / SHARDS / shard.name
        try:
            _regular(path, "shard")
            with location.open_h5(path) as f:
                if stat_key(f) != shard.key:
                    raise _Replaced(f"{path} changed since the store was read")
                return _rows_of(f["features"], entries)
        except FileNotFoundError as err:
            raise _Replaced(f"{path} was retired since the store was read") from err
        except OSError as err:
            raise CacheError(f"cannot read the shard {path} ({err}): restore it from a copy "
                             "of the store") from err

    return _found(plan, read)


def _rows_of(feats, entries: np.ndarray) -> np.ndarray:
    """Rows ``entries`` (sorted, distinct) of a features dataset: one read when dense."""
    lo, hi = int(entries[0]), int(entries[-1]) + 1
    if hi - lo <= 4 * len(entries):
        return feats[lo:hi][entries - lo]
    return feats[entries]


def _found(plan: Plan, read) -> Found:
    """The rows and failures ``plan`` found, read source by source (``read(k, entries)``)."""
    rows, failed = {}, {}
    for k in np.unique(plan.source[plan.source >= 0]):
        source = plan.sources[k]
        at = np.flatnonzero(plan.source == k)
        entries = plan.entry[at]
        good = entries < source.n_rows
        order = np.argsort(entries[good])
        if len(order):
            data = read(int(k), entries[good][order])
            rows.update(zip((plan.paths[i] for i in at[good][order]), data))
        failed.update((plan.paths[i], source.reasons[e - source.n_rows])
                      for i, e in zip(at[~good], entries[~good]))
    return Found(rows, failed, [plan.paths[i] for i in plan.compute])
