"""Bringing a feature file up to date: which rows to reuse, which images to compute, what is gone.

An entry (a row, or a recorded failure) of the existing output or of a published shard is reused
for an input when its path is the same and its file is unchanged: same size and mtime, or, with
``verify``, the same SHA-256 of the content.  Everything else is computed.  Entries of files that
are no longer among the inputs are dropped.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import compress, repeat

import numpy as np

from .store import MISSING, FileIds, Index, Rows, hash_files, stat_files


@dataclass
class Plan:
    """For input i: ``sources[source[i]]`` entry ``entry[i]`` (``source[i] == -1``: compute it)."""

    paths: list[str]
    sources: list[Index]
    source: np.ndarray
    entry: np.ndarray
    ids: FileIds          # identity recorded with each input's row
    removed: int = 0      # entries of the old output whose file is no longer an input
    reused: int = 0       # inputs whose row was reused (a carried-over failure is not counted)
    extra_failed: list[tuple[str, str]] = field(default_factory=list)  # found but unusable
    store_state: object = None  # a store's state when planned (vggfeat.cache.sharded.State)
    # Adding (a cache, see vggfeat.sklearn.VGGFeatures): the output's entries of other paths
    # are kept, not removed; ``kept`` is the output's setting as planned (None: none yet).
    add: bool = False
    kept: Index | None = None
    group: str = "/"  # the group of the file written ("/": its root)

    @property
    def compute(self) -> np.ndarray:
        return np.flatnonzero(self.source < 0)

    def attach(self, computed: list[Index]) -> None:
        """Take the rows computed since planning for the inputs that needed them."""
        pos = {p: i for i, p in enumerate(self.paths)}
        for index in computed:
            k = len(self.sources)
            self.sources.append(index)
            for e, path in enumerate(index.paths):
                i = pos.get(path, -1)
                if i >= 0 and self.source[i] < 0:
                    self.source[i], self.entry[i] = k, e
                    self.ids.size[i] = index.ids.size[e]
                    self.ids.mtime_ns[i] = index.ids.mtime_ns[e]
                    self.ids.sha256[i] = index.ids.sha256[e]

    def is_row(self) -> np.ndarray:
        """Per input: True if it has a descriptor row (False: a recorded failure)."""
        n_rows = np.array([s.n_rows for s in self.sources] + [0], np.int64)
        return (self.source >= 0) & (self.entry < n_rows[self.source])

    def output(self) -> tuple[Rows, np.ndarray, list[str], list[str], FileIds]:
        """(rows to copy, inputs with a row, failed paths, their reasons and identities) of the
        finished file, in input order."""
        if (self.source < 0).any():
            raise RuntimeError("output() before every input has an entry")
        good = self.is_row()
        rows_at = np.flatnonzero(good)
        rows = Rows([s.file for s in self.sources], self.source[rows_at], self.entry[rows_at],
                    [s.group for s in self.sources])
        bad = np.flatnonzero(~good)
        reasons = [self.sources[self.source[i]].reasons[self.entry[i] - self.sources[
            self.source[i]].n_rows] for i in bad]
        failed_paths = [self.paths[i] for i in bad] + [p for p, _ in self.extra_failed]
        reasons += [r for _, r in self.extra_failed]
        failed_ids = FileIds.concat([self.ids.take(bad), FileIds.empty(len(self.extra_failed))])
        return rows, rows_at, failed_paths, reasons, failed_ids


@dataclass
class Output:
    """What a feature file's group is written from (the arguments of ``write_group``)."""

    rows: Rows
    paths: list[str]
    ids: FileIds
    labels: np.ndarray | None
    failed_paths: list[str]
    failed_reasons: list[str]
    failed_ids: FileIds

    @classmethod
    def of(cls, plan: Plan, labels: np.ndarray | None) -> Output:
        """The inputs' entries in input order (``labels``: one per input, or None)."""
        rows, rows_at, failed_paths, reasons, failed_ids = plan.output()
        return cls(rows, [plan.paths[i] for i in rows_at], plan.ids.take(rows_at),
                   None if labels is None else np.asarray(labels, np.int64)[rows_at],
                   failed_paths, reasons, failed_ids)

    def after(self, kept: Index, kept_labels: np.ndarray | None, inputs: set[str]) -> Output:
        """Every entry of ``kept`` whose path is not among ``inputs``, then these: what adding
        the inputs to an existing group gives (a cache keeps the rows it was not asked about).
        Rows of no label get −1 when the others have labels."""
        others = np.array([e for e, p in enumerate(kept.paths) if p not in inputs], np.int64)
        row_e, fail_e = others[others < kept.n_rows], others[others >= kept.n_rows]
        k = len(self.rows.sources)
        rows = Rows(self.rows.sources + [kept.file],
                    np.concatenate([np.full(len(row_e), k), self.rows.source]).astype(np.int64),
                    np.concatenate([row_e, self.rows.row]).astype(np.int64),
                    (self.rows.groups or ["/"] * k) + [kept.group])
        labels = None
        if kept_labels is not None or self.labels is not None:
            mine = self.labels if self.labels is not None else np.full(len(self.paths), -1)
            theirs = kept_labels[row_e] if kept_labels is not None else np.full(len(row_e), -1)
            labels = np.concatenate([theirs, mine]).astype(np.int64)
        return Output(rows, [kept.paths[e] for e in row_e] + self.paths,
                      FileIds.concat([kept.ids.take(row_e), self.ids]), labels,
                      [kept.paths[e] for e in fail_e] + self.failed_paths,
                      [kept.reasons[e - kept.n_rows] for e in fail_e] + self.failed_reasons,
                      FileIds.concat([kept.ids.take(fail_e), self.failed_ids]))


def plan_update(paths: list[str], sources: list[Index], *, output: Index | None = None,
                extra_failed: list[tuple[str, str]] = (), verify: bool = False,
                retry_failed: bool = False, keep_deleted: bool = False,
                hash_threads: int = 4, now: FileIds | None = None,
                located: list[np.ndarray] | None = None) -> Plan:
    """Match every input with a reusable entry of ``sources`` (earlier sources win).

    ``keep_deleted``: a row of a file that no longer exists is reused (a deleted file cannot have
    changed); by default it is computed again.

    ``output`` (one of ``sources``, or None) is the existing finished file: its entries whose
    file is no longer an input, nor among ``extra_failed`` (path, reason), count as removed.

    ``now``: the inputs' stat, when the caller has taken it already (one per input);
    ``located``: per source, the input number of each entry (−1: none), when the caller
    knows them (vggfeat.cache.sharded.locate_inputs).
    """
    n = len(paths)
    with ThreadPoolExecutor(1) as pool:  # the stat (in processes, for many files) runs while
        stat = pool.submit(stat_files, paths) if now is None else None  # entries are matched
        if located is None:
            pos = dict(zip(paths, range(n)))  # (C-level passes: 1M inputs and entries are common)
            located = [np.fromiter(map(pos.get, s.paths, repeat(-1)), np.int64, len(s.paths))
                       for s in sources]
        else:
            located = [at.copy() for at in located]
        for s, at in zip(sources, located):
            if s.live is not None:
                at[~s.live] = -1
        now = now.copy() if stat is None else stat.result()
    if verify:
        known = np.unique(np.concatenate([at[at >= 0] for at in located] or [np.empty(0, int)]))
        now.sha256[known] = hash_files([paths[i] for i in known], hash_threads)
    source, entry = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    for k, (index, at) in enumerate(zip(sources, located)):
        e = np.flatnonzero(at >= 0)
        i = at[e]
        stored = index.ids.take(e)
        if verify:
            same = (stored.sha256 == now.sha256[i]).all(axis=1) & (
                stored.sha256.any(axis=1) | ((stored.size == MISSING) & (now.size[i] == MISSING)))
        else:
            same = (stored.size == now.size[i]) & (stored.mtime_ns == now.mtime_ns[i])
        if keep_deleted:
            same |= (now.size[i] == MISSING) & (e < index.n_rows)
        if retry_failed:
            same &= e < index.n_rows
        take = same & (source[i] < 0)
        i, e = i[take], e[take]
        if (np.diff(i) <= 0).any():  # an input listed twice: its first entry, once
            first = np.unique(i, return_index=True)[1]
            i, e = i[first], e[first]
        source[i], entry[i] = k, e
        if not verify:
            now.sha256[i] = index.ids.sha256[e]
    removed = 0
    if output is not None:
        found = {p for p, _ in extra_failed}
        gone = (located[sources.index(output)] < 0).tolist()
        removed = sum(p not in found for p in compress(output.paths, gone))
    plan = Plan(list(paths), list(sources), source, entry, now, removed,
                extra_failed=list(extra_failed))
    plan.reused = int(np.count_nonzero(plan.is_row()))
    return plan
