"""A feature store: a folder of immutable HDF5 shards and an append-only index of changes.

Layout (docs/store.md)::

    OUT/settings.json                       the descriptor settings, written once
    OUT/shards/shard-<name>.h5              immutable shards, the layout of a run's shards
    OUT/index/<seq:012d>-<writer>.json      immutable index entries

Every file is created under a temporary name and published by a rename (a shard or an entry
is whole or absent) and is never modified afterwards.  An index entry lists the shards it adds
and the entries (rows or recorded failures) it removes from earlier shards, or whole shards it
retires.  A reader lists the entries, replays them in (seq, writer) order and so sees one
deterministic state; a path listed live in several shards counts once, from the shard added
last.  Writers only create new, uniquely named files: no file is shared for writing, so no lock
is needed for readers and writers to agree.  Rows are presented sorted by path.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
import uuid
from itertools import chain, compress, repeat
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import CacheError, ConfigError, InputError
from ..choices import HDF5_SUFFIXES
from ..fileio import leftovers
from . import location
from .location import Where, is_remote, listing, locate, open_h5
from .settings import ALT
from .store import (
    FileIds,
    Index,
    Rows,
    _plain,
    _strings,
    copy_rows,
    index_of,
    io_error,
    write_shard,
)

SETTINGS = "settings.json"
SHARDS = "shards"
INDEX = "index"
FORMAT = "vggfeat-store/1"
ENTRY_NAME = re.compile(r"^(\d{12})-([0-9a-f]{32})\.json$")
SHARD_NAME = re.compile(r"^shard-[A-Za-z0-9_-]+\.h5$")
# Compaction rewrites a shard once this fraction of its entries is dead; an update compacts
# the store by itself once this fraction of all its rows' bytes is dead.
COMPACT_DEAD_FRACTION = 0.5
COMPACT_SHARD_BYTES = 64 << 20  # new shards of a compaction: built in memory, so bounded
# Reading a store opens every live shard once (~10 ms each): small shards (a run publishes one
# every --shard-size images) are packed into large ones once there are this many of them.
SMALL_SHARD_BYTES = COMPACT_SHARD_BYTES // 4
PACK_SMALL_SHARDS = 64


def is_store(path: str | os.PathLike | Where) -> bool:
    """An output is a store when it is a folder, or a name without a file suffix; in a bucket,
    any name but a ``.h5``/``.hdf5`` file's (a bucket has no folders to look at)."""
    where = locate(path)
    if is_remote(where):
        return where.suffix.lower() not in HDF5_SUFFIXES
    return where.is_dir() or (not where.exists() and where.suffix == "")


# -- files of a store ------------------------------------------------------------------------------

def _regular(path: Where, what: str) -> None:
    """Refuse a planted link (or anything but a plain file) before opening it (a bucket holds
    only objects: nothing to refuse there)."""
    if is_remote(path):
        return
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        raise CacheError(f"{what} {path} is a symbolic link, which vggfeat never follows: "
                         "remove it (a store holds only plain files)")
    if not stat.S_ISREG(mode):
        raise CacheError(f"{what} {path} is not a plain file: remove it")


def _folder(store: Where, name: str, create: bool = False) -> Where:
    folder = store / name
    if is_remote(folder):  # (a bucket's folders are prefixes of names: nothing to create)
        return folder
    if folder.is_symlink():
        raise CacheError(f"{folder} is a symbolic link, which vggfeat never follows: a store's "
                         "folders are plain folders; remove the link")
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise io_error(err, "create", folder) from err
    return folder


def read_settings(store: Where) -> dict | None:
    path = store / SETTINGS
    try:
        _regular(path, "settings file")
        data = json.loads(location.read_bytes(path))
        return data["settings"] if data.get("format") == FORMAT else None
    except (FileNotFoundError, NotADirectoryError):  # no store (yet)
        return None
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise CacheError(f"{path} is damaged ({err}): a store's settings.json is written once by "
                         "vggfeat; restore it from a copy of the store") from err


def write_settings(store: Where, settings: dict) -> None:
    """Write ``settings.json`` once: it never replaces a file (another writer may have been
    first; the caller compares settings again)."""
    path = store / SETTINGS
    data = json.dumps({"format": FORMAT, "settings": settings}, indent=1, sort_keys=True)
    try:
        location.publish_once(path, data.encode())
    except OSError as err:
        raise io_error(err, "write", path) from err


# -- index entries ---------------------------------------------------------------------------------

@dataclass
class Entry:
    """One published change: shards added (name → (rows, failures, bytes)), entries removed
    (shard → entry numbers), shards retired, and the writer's class names."""

    name: str
    added: dict[str, list[int]] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)
    retired: list[str] = field(default_factory=list)
    class_names: list[str] | None = None
    labelled: bool = False  # the writer's inputs had classes
    writer: dict | None = None  # WRITER_KEYS of the run that computed the rows it adds
    # Units of work (vggfeat.data.units) this entry brings up to date: id → fingerprint of the
    # input it was computed from.  An entry with units changes only the rows of its own inputs.
    units: dict[str, str] = field(default_factory=dict)
    # The ids of every unit of the run's inputs (written by the run's first process): records
    # of other units are forgotten, since rows of inputs outside the run may have been removed.
    keep_units: list[str] | None = None

    @property
    def seq(self) -> int:
        return int(self.name[:12])


def list_entries(store: Where) -> list[Entry]:
    folder = _folder(store, INDEX)
    names = sorted(n for n in listing(folder) if ENTRY_NAME.match(n))
    return [_read_entry(folder / n) for n in names]


def _read_entry(path: Where) -> Entry:
    _regular(path, "index entry")
    try:
        data = json.loads(location.read_bytes(path))
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, not {FORMAT}")
        entry = Entry(path.name, {k: list(v) for k, v in data["added"].items()},
                      {k: list(v) for k, v in data["removed"].items()}, list(data["retired"]),
                      data.get("class_names"), bool(data.get("labelled")),
                      _writer(data.get("writer")), _units(data.get("units", {})),
                      _unit_ids(data.get("keep_units")))
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as err:
        raise damaged_entry(path, str(err)) from err
    _check_shard_names(path, entry)
    _check_numbers(path, entry)
    return entry


# What an entry records of the run that wrote it, and an exported file carries (extract.md).
WRITER_KEYS = ("weights_source", "vggfeat_version", "torch_version")


def _writer(value) -> dict | None:
    if value is not None and not (isinstance(value, dict) and all(
            isinstance(value.get(k), str) for k in WRITER_KEYS)):
        raise ValueError(f"writer {value!r} is not {{{', '.join(WRITER_KEYS)}}}")
    return None if value is None else {k: value[k] for k in WRITER_KEYS}


def _units(value) -> dict[str, str]:
    if not (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in value.items())):
        raise ValueError(f"units {str(value)[:100]!r} is not {{unit: fingerprint}}")
    return dict(value)


def _unit_ids(value) -> list[str] | None:
    if value is not None and not (isinstance(value, list) and all(isinstance(v, str)
                                                                  for v in value)):
        raise ValueError(f"keep_units {str(value)[:100]!r} is not a list of unit ids")
    return value


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_numbers(path: Where, entry: Entry) -> None:
    """Entry numbers and sizes are counts: a negative one would remove a row from the end."""
    bad = next((f"added {name}: {v!r} is not 3 counts" for name, v in entry.added.items()
                if len(v) != 3 or not all(map(_count, v))), None)
    bad = bad or next((f"removed {name}: {v!r} is not a list of entry numbers"
                       for name, v in entry.removed.items() if not all(map(_count, v))), None)
    names = entry.class_names
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str)
                                                                    for n in names)):
        bad = bad or f"class_names {names!r} is not a list of names"
    if bad:
        raise damaged_entry(path, bad[:300])


def damaged_entry(path: Where, why: str) -> CacheError:
    return CacheError(f"index entry {path} is damaged ({why}); the store cannot be read "
                      "safely without it: restore it from a copy of the store, or move it away "
                      "to drop the change it records (then run the update again)")


def _check_shard_names(path: Where, entry: Entry) -> None:
    """Every shard an entry names is a plain name in ``shards/``: a name such as
    ``../../x`` would make readers serve, and compaction delete, a file outside the store."""
    for name in [*entry.added, *entry.removed, *entry.retired]:
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
            raise CacheError(f"index entry {path} names the shard {name!r}, which is not a "
                             "shard name (shard-….h5, a plain name in shards/): vggfeat did not "
                             "write this entry; move it out of the store (or restore the store "
                             "from a copy) before using the store")


def publish_entry(store: Where, entry: Entry) -> Where:
    """Write ``entry`` under the next sequence number and this writer's random id."""
    folder = _folder(store, INDEX, create=True)
    seqs = [int(n[:12]) for n in listing(folder) if ENTRY_NAME.match(n)]
    name = f"{max(seqs, default=0) + 1:012d}-{uuid.uuid4().hex}.json"
    data = {"format": FORMAT, "added": entry.added, "removed": entry.removed,
            "retired": entry.retired, "class_names": entry.class_names,
            "labelled": entry.labelled, "writer": entry.writer,
            **({"units": entry.units} if entry.units else {}),
            **({"keep_units": entry.keep_units} if entry.keep_units is not None else {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        location.publish(folder / name, (json.dumps(data, sort_keys=True) + "\n").encode())
        return folder / name
    except OSError as err:
        raise io_error(err, "publish the index entry", folder / name) from err


# -- the live state --------------------------------------------------------------------------------

@dataclass
class Shard:
    """A live shard: its entries (rows, then failures), which are live, and its rows' labels."""

    name: str
    index: Index
    live: np.ndarray          # bool per entry
    bytes: int
    key: tuple                # the file version read (see rows.stat_key)
    labels: list[str] | None = field(default=None, repr=False)  # None: not read yet

    def stored_labels(self) -> list[str] | None:
        """Each row's class name as stored (None: the shard stores none, all are ""); read on
        first use, since an update of unlabelled rows needs none."""
        if self.labels is None:
            with open_h5(self.index.file) as f:
                self.labels = _label_names(f) or []
        return self.labels or None

    @property
    def label_names(self) -> list[str]:
        """Each row's class name ("" when none)."""
        return self.stored_labels() or [""] * self.index.n_rows

    def live_paths(self) -> list[str]:
        """The paths of the live entries, in entry order."""
        if self.live.all():
            return self.index.paths
        return list(compress(self.index.paths, self.live.tolist()))


def _label_names(f) -> list[str] | None:
    return _strings(f["label_names"]) if "label_names" in f else None


@dataclass
class Entries:
    """Entries of a store's live shards: ``paths[i]`` is entry ``entry[i]`` of shard number
    ``shard[i]``."""

    paths: list[str]
    shard: np.ndarray
    entry: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, part: slice) -> Entries:
        return Entries(self.paths[part], self.shard[part], self.entry[part])

    @classmethod
    def of_live(cls, shards: list[tuple[int, Shard]], failures: bool = False) -> Entries:
        """The live rows (or failures) of ``shards`` ((number, shard) pairs), sorted by path."""
        picked = [(k, s, np.flatnonzero(s.live[s.index.n_rows:]) + s.index.n_rows if failures
                   else np.flatnonzero(s.live[:s.index.n_rows])) for k, s in shards]
        paths = list(chain.from_iterable(map(s.index.paths.__getitem__, e.tolist())
                                         for _, s, e in picked))
        order = np.array(sorted(range(len(paths)), key=paths.__getitem__), np.int64)
        shard = np.concatenate([np.full(len(e), k, np.int64) for k, _, e in picked] or [EMPTY])
        entry = np.concatenate([e for _, _, e in picked] or [EMPTY]).astype(np.int64)
        return cls([paths[i] for i in order.tolist()], shard[order], entry[order])

    def reasons(self, shards: list[Shard]) -> list[str]:
        """The recorded reason of each entry (failures only)."""
        return [shards[k].index.reasons[e - shards[k].index.n_rows]
                for k, e in zip(self.shard.tolist(), self.entry.tolist())]


def groups(values: np.ndarray):
    """(value, positions of that value) for each distinct value, positions in order."""
    order = np.argsort(values, kind="stable")
    distinct, starts = np.unique(values[order], return_index=True)
    return zip(distinct.tolist(), np.split(order, starts[1:]))


@dataclass
class State:
    """What a store holds after replaying its index entries."""

    store: Where
    settings: dict | None
    entries: list[Entry]
    shards: list[Shard]       # live shards, in the order they were added
    listed: set[str]          # every shard any entry names
    retired: set[str]         # shards retired by an entry
    class_names: list[str] | None
    units: dict[str, str] = field(default_factory=dict)  # unit id → fingerprint, as recorded
    live: LiveEntries | None = None  # every live entry, by path (see _live_entries)

    @property
    def writer(self) -> dict | None:
        """What the latest entry that records it says of its writer (see WRITER_KEYS)."""
        return next((e.writer for e in reversed(self.entries) if e.writer), None)

    def live_rows(self) -> Entries:
        """Every live row, sorted by path."""
        return Entries.of_live(list(enumerate(self.shards)))

    def live_row_paths(self):
        """The path of every live row, shard by shard (unsorted)."""
        return chain.from_iterable(compress(s.index.paths[:s.index.n_rows],
                                            s.live[:s.index.n_rows].tolist())
                                   for s in self.shards)

    def live_hashes(self) -> dict[str, bytes]:
        """Path → content hash (SHA-256) of every live row."""
        return {s.index.paths[e]: s.index.ids.sha256[e].tobytes() for s in self.shards
                for e in np.flatnonzero(s.live[:s.index.n_rows])}

    def live_failures(self) -> Entries:
        """Every live recorded failure, sorted by path."""
        return Entries.of_live(list(enumerate(self.shards)), failures=True)


def read_state(store: Where) -> State:
    """Replay the index entries of ``store``; every live shard's index is read (one at a time)."""
    if not location.is_folder(store):
        raise InputError(f"feature store {store} does not exist")
    settings = read_settings(store)
    _folder(store, SHARDS)  # a link there is refused, as everywhere in a store
    if is_remote(store):  # one listing gives each shard's size and ETag: no HEAD per shard
        listing(store / SHARDS)
    entries = list_entries(store)
    removed: dict[str, set[int]] = {}
    order: list[str] = []
    retired: set[str] = set()
    sizes: dict[str, int] = {}  # entries of each shard, as its adding entry says
    class_names, labelled = None, False
    units: dict[str, str] = {}
    for entry in entries:
        for name in entry.added:
            if name not in removed and name not in retired:
                order.append(name)
                removed[name] = set()
        sizes.update((name, n_rows + n_failed) for name, (n_rows, n_failed, _) in
                     entry.added.items())
        for name, dead in entry.removed.items():
            if dead and name in sizes and max(dead) >= sizes[name]:
                raise damaged_entry(store / INDEX / entry.name, f"removed {name}: entry "
                                    f"{max(dead)} of a shard of {sizes[name]} entries")
            removed.setdefault(name, set()).update(dead)
        retired.update(entry.retired)
        if entry.keep_units is not None:
            units = {k: v for k, v in units.items() if k in set(entry.keep_units)}
        units.update(entry.units)
        class_names, labelled = _class_names_after(entry, class_names, labelled)
    listed = {n for e in entries for n in list(e.added) + list(e.removed) + e.retired}
    shards = [_live_shard(store, name, removed[name]) for name in order if name not in retired]
    return State(store, settings, entries, shards, listed, retired,
                 class_names if labelled else None, units, _live_entries(shards))


def _class_names_after(entry: Entry, names: list[str] | None, labelled: bool
                       ) -> tuple[list[str] | None, bool]:
    """An entry of some units by one of several writers adds its classes to the known ones;
    any other entry (one writer's, or the first of several: it lists all units) states the
    classes of all inputs."""
    if not entry.units or entry.keep_units is not None or not labelled or not entry.labelled:
        return entry.class_names, entry.labelled
    return sort_class_names(set(names or ()) | set(entry.class_names or ())), True


def sort_class_names(names) -> list[str]:
    """Class names sorted as text, or as numbers when all are integers (2, 10, 1 → 1, 2, 10)."""
    names = list(names)
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def read_store(store: Where) -> State:
    """:func:`read_state` of a folder that is a store (holds ``settings.json``)."""
    state = read_state(store)
    if state.settings is None:
        raise CacheError(f"{store} is not a vggfeat feature store (no {SETTINGS}); stores are "
                         "written by vggfeat extract -o FOLDER")
    return state


def _live_shard(store: Where, name: str, dead: set[int]) -> Shard:
    path = store / SHARDS / name
    try:
        _regular(path, "shard")
        with open_h5(path) as f:
            from .rows import stat_key

            index = index_of(f, path)
            key = stat_key(f)
            labels = None if "label_names" in f else []  # (read when needed: see Shard)
    except FileNotFoundError as err:
        raise CacheError(f"shard {path} is missing, but the index lists it: restore it from a "
                         "copy of the store; or, to recompute its rows, remove the index "
                         "entries that name it and run the update again") from err
    except OSError as err:
        raise CacheError(f"shard {path} is damaged or truncated ({err}): restore it from a copy "
                         "of the store; or, to recompute its rows, remove the index entries "
                         "that name it and run the update again") from err
    live = np.ones(len(index.paths), bool)
    live[[e for e in dead if e < len(live)]] = False
    return Shard(name, index, live, key[2], key, labels)


@dataclass
class LiveEntries:
    """Every live entry of a store: ``where[path]`` is its number ``g``, and it is entry
    ``entry[g]`` of shard ``shard[g]`` (numbered in the state's order)."""

    where: dict[str, int]
    shard: np.ndarray
    entry: np.ndarray


def _live_entries(shards: list[Shard]) -> LiveEntries:
    """The live entries by path.  A path live in several shards (two writers, or a crash
    between publishing and removing) counts once, from the shard added last: the dict keeps
    the last number given to a path, and the earlier entries are marked dead."""
    entries = [np.flatnonzero(s.live) for s in shards]
    shard = np.repeat(np.arange(len(shards), dtype=np.int64), [len(e) for e in entries])
    entry = np.concatenate(entries) if entries else EMPTY
    paths = chain.from_iterable(s.live_paths() for s in shards)
    where = dict(zip(paths, range(len(entry))))  # (one C-level pass: 1M entries are common)
    if len(where) < len(entry):
        winner = np.zeros(len(entry), bool)
        winner[np.fromiter(where.values(), np.int64, len(where))] = True
        for g in np.flatnonzero(~winner):
            shards[shard[g]].live[entry[g]] = False
    return LiveEntries(where, shard, entry)


def unlisted_shards(store: Where, state: State) -> list[Where]:
    """Shard files no entry names: a killed update's (reused by the next update of the same
    inputs) or a writer's still at work; oldest first (in a bucket, by the listing's
    LastModified: one request for them all)."""
    folder = store / SHARDS
    found = listing(folder)
    names = [n for n in found if SHARD_NAME.match(n) and n not in state.listed]
    return [folder / n for n in sorted(names, key=lambda n: (found[n].mtime_ns, n))]


# A hidden temporary file this old was left by a killed writer: none takes this long to write
# one file (shards are built in memory and written in one go).
STALE_SECONDS = 3600


def remove_stale_temporaries(store: Where, age: float = STALE_SECONDS) -> int:
    """Delete the hidden temporary files (``.NAME.<random>.tmp``) that killed writers left in
    ``store``, ``shards/`` and ``index/``, once older than ``age`` seconds: a fresh one may be
    another writer's, still at work.  Links are removed, never followed.  How many went.
    A store in a bucket has none: every object is uploaded whole from memory."""
    if is_remote(store):
        return 0
    now, removed = time.time(), 0
    for folder in (store, store / SHARDS, store / INDEX):
        if folder.is_symlink() or not folder.is_dir():
            continue
        for path in leftovers(folder):
            try:
                if now - os.lstat(path).st_mtime >= age:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # another writer's cleanup was first
            except OSError as err:
                raise io_error(err, "remove the leftover", path) from err
    return removed


def foreign_files(store: Where) -> list[Where]:
    """Files in a store that vggfeat did not write there (ignored by readers); ``alt/``
    holds the sub-stores of further settings, checked on their own."""
    found = [store / n for n in listing(store)
             if n not in (SHARDS, INDEX, SETTINGS, ALT) and not n.startswith(".")]
    for sub, pattern in ((SHARDS, SHARD_NAME), (INDEX, ENTRY_NAME)):
        found += [store / sub / n for n in listing(store / sub)
                  if not pattern.match(n) and not n.startswith(".")]
    return sorted(found)


# -- reading ---------------------------------------------------------------------------------------

def load_store(store: Where, *, return_X_y: bool = False, lazy: bool = False,
               max_open: int = 16):
    """The store as one dataset: the Bunch of :func:`vggfeat.load_features` (see there)."""
    from sklearn.utils import Bunch

    state = read_state(store)
    if state.settings is None:
        raise CacheError(f"{store} is not a vggfeat feature store (no {SETTINGS}); stores are "
                         "written by vggfeat extract -o FOLDER")
    rows = state.live_rows()
    view = _view(state, rows, max_open)
    data = view if lazy else view[:]
    if not lazy:
        view.close()
    target = _targets(state, rows)
    if return_X_y:
        return data, target
    failures = state.live_failures()
    shards = state.shards
    return Bunch(data=data, target=target, target_names=state.class_names,
                 paths=rows.paths, failed=list(zip(failures.paths, failures.reasons(shards))),
                 input_sizes=_input_sizes(state, rows),
                 attrs={**state.settings, "num_images": len(rows), "num_failed": len(failures),
                        "num_shards": len(shards), "store": True},
                 file=data if lazy else None)


def _view(state: State, rows: Entries, max_open: int):
    from .rows import FeatureRows, RowSource

    dim, dtype = _shape(state)
    by_shard = np.argsort(rows.shard, kind="stable")  # each shard's rows, in the view's order
    counts = np.bincount(rows.shard, minlength=len(state.shards))
    per_shard = np.split(rows.entry[by_shard], np.cumsum(counts)[:-1])
    where = np.empty(len(rows), np.int64)  # row i of the view: entry where[i] of the sources
    where[by_shard] = np.arange(len(rows))
    sources = [RowSource(state.store / SHARDS / s.name, len(r), s.key, "/", r)
               for s, r in zip(state.shards, per_shard)]
    return FeatureRows(sources, dim, dtype, max_open=max_open, order=where)


def _shape(state: State) -> tuple[int, str]:
    settings = state.settings or {}
    dtype = settings.get("dtype", "float32")
    for shard in state.shards:
        with open_h5(state.store / SHARDS / shard.name) as f:
            return f["features"].shape[1], dtype
    return int(settings.get("dim", 0)), dtype


def _targets(state: State, rows) -> np.ndarray | None:
    if state.class_names is None:
        return None
    position = {name: i for i, name in enumerate(state.class_names)}
    target = np.full(len(rows), -1, np.int64)
    for k, at in groups(rows.shard):
        names = map(state.shards[k].label_names.__getitem__, rows.entry[at].tolist())
        target[at] = np.fromiter(map(position.get, names, repeat(-1)), np.int64, len(at))
    return target


def _input_sizes(state: State, rows: Entries) -> np.ndarray:
    sizes = np.zeros((len(rows), len((state.settings or {}).get("scales", [0])), 2), np.int32)
    for k, at in groups(rows.shard):
        with open_h5(state.store / SHARDS / state.shards[k].name) as f:
            block = f["input_sizes"][:]
        if sizes.shape[1:] != block.shape[1:]:
            sizes = np.zeros((len(rows), *block.shape[1:]), np.int32)
        sizes[at] = block[rows.entry[at]]
    return sizes


def iter_features(path: str | os.PathLike, *, rows: int = 65536):
    """(X, y) blocks of at most ``rows`` rows, in the order of ``load_features``, for
    ``partial_fit`` on data larger than memory (a feature file or a store)."""
    from .store import load_features

    if not isinstance(rows, int) or rows < 1:
        raise ConfigError(f"iter_features: rows must be a whole number ≥ 1, got {rows!r}")
    bunch = load_features(path, lazy=True)
    try:
        for lo, block in bunch.data.blocks(rows):
            yield block, None if bunch.target is None else bunch.target[lo:lo + len(block)]
    finally:
        bunch.data.close()


def store_attrs(store: Where) -> dict:
    """The settings, ``num_images``, ``num_failed`` and ``failed`` [(path, reason)] of a store,
    from one reading of its index (no features are read)."""
    state = read_state(store)
    failures = state.live_failures()
    failed = list(zip(failures.paths, failures.reasons(state.shards)))
    shards = state.shards
    n_rows = sum(int(np.count_nonzero(s.live[:s.index.n_rows])) for s in shards)
    return {**(state.settings or {}), "num_images": n_rows, "num_failed": len(failed),
            "failed": failed}


# -- updating --------------------------------------------------------------------------------------

def planning_sources(state: State, unlisted: list[Where]) -> list[Index]:
    """What an update may reuse: shards of a killed update (newest first), then the live
    shards with their dead entries hidden."""
    from .store import read_index

    sources = []
    for path in reversed(unlisted):
        try:
            _regular(path, "shard")
            sources.append(read_index(path))
        except (OSError, CacheError):
            continue  # a damaged leftover: its rows are computed again
    sources += [replace(shard.index, live=shard.live) for shard in state.shards]
    return sources


def locate_inputs(paths: list[str], state: State, sources: list[Index]) -> list[np.ndarray]:
    """For each of ``sources`` (:func:`planning_sources`: unlisted shards, then the live ones),
    the input number of each of its entries (−1: none), for ``plan_update(located=)``.  The
    inputs are looked up among the store's live entries, which are indexed by path already;
    only the entries of unlisted shards (a killed run's, few) are matched one by one."""
    live = state.live
    g = np.fromiter(map(live.where.get, paths, repeat(-1)), np.int64, len(paths))
    found = np.flatnonzero(g >= 0)
    located = [np.full(len(s.index.paths), -1, np.int64) for s in state.shards]
    shard, entry = live.shard[g[found]], live.entry[g[found]]
    for k, at in groups(shard):
        located[k][entry[at]] = found[at]
    unlisted = sources[:len(sources) - len(state.shards)]
    if not unlisted:
        return located
    input_of = np.full(len(live.entry), -1, np.int64)  # live entry → input
    input_of[g[found]] = found
    new = {paths[i]: i for i in np.flatnonzero(g < 0).tolist()}  # inputs the store lacks
    return [np.array([input_of[live.where[p]] if p in live.where else new.get(p, -1)
                      for p in index.paths], np.int64) for index in unlisted] + located


def label_names_of(source_file: Where, state: State, cache: dict) -> list[str] | None:
    """The label name of each row of a shard (live or not); None: it stores none (all "")."""
    if not cache:
        cache.update({state.store / SHARDS / s.name: s for s in state.shards})
    if source_file not in cache:
        with open_h5(source_file) as f:
            cache[source_file] = _label_names(f)
    found = cache[source_file]
    return found.stored_labels() if isinstance(found, Shard) else found


def copy_shard_rows(out_folder: Where, name: str, picks: list[tuple[Where, int]], *,
                    ids: FileIds, paths: list[str], label_names: list[str], dim: int,
                    n_scales: int, dtype: str) -> Where:
    """A new shard holding existing rows ``picks`` (file, row) under new identities/labels."""
    files = sorted({f for f, _ in picks})
    number = {f: k for k, f in enumerate(files)}
    rows = Rows(files, np.array([number[f] for f, _ in picks], np.int64),
                np.array([r for _, r in picks], np.int64))
    feats = np.empty((len(picks), dim), dtype)
    sizes = np.empty((len(picks), n_scales, 2), np.int32)
    copy_rows(rows, feats, sizes, block=max(1, len(picks)))
    return write_shard(out_folder, name, paths=paths, ids=ids, features=feats,
                       input_sizes=sizes, failed_paths=[], failed_reasons=[],
                       failed_ids=FileIds.empty(0), dtype=dtype, label_names=label_names)


def shard_name(kind: str) -> str:
    """``kind``: ``r000`` (a run's rank 0), ``u`` (an update's copies), ``c`` (compaction)."""
    return f"shard-{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.h5"


def dead_fraction(state: State, entry: Entry | None = None) -> float:
    """Dead share of the bytes of the live shards' files (after ``entry``, if given; the
    shards it adds are wholly live but for what it removes from them)."""
    total = dead = 0.0
    for shard in state.shards:
        if entry is not None and shard.name in entry.retired:
            continue
        live = shard.live.copy()
        if entry is not None and shard.name in entry.removed:
            live[entry.removed[shard.name]] = False
        total += shard.bytes
        dead += shard.bytes * (1 - live.mean()) if len(live) else 0.0
    for name, (n_rows, n_failed, size) in (entry.added.items() if entry else ()):
        entries = n_rows + n_failed
        total += size
        dead += size * len(entry.removed.get(name, ())) / entries if entries else 0.0
    return dead / total if total else 0.0


def needs_compaction(state: State, entry: Entry) -> bool:
    """After ``entry``: half the live bytes dead, or many small shards (see compact)."""
    small = sum(s.bytes < SMALL_SHARD_BYTES for s in state.shards if s.name not in entry.retired)
    small += sum(size < SMALL_SHARD_BYTES for _, _, size in entry.added.values())
    return dead_fraction(state, entry) >= COMPACT_DEAD_FRACTION or small >= PACK_SMALL_SHARDS


def after_update(store: Where, state: State, entry: Entry) -> None:
    """What a lone writer (holding the store's lock) does once ``entry`` is published: compact
    the store past the thresholds (see :func:`compact`), else delete the shards ``entry``
    retired, whose live rows are elsewhere now (a relabelling retires a whole copy)."""
    if needs_compaction(state, entry):
        compact(store)
    else:
        delete_shards(store, entry.retired)


def delete_shards(store: Where, names) -> int:
    """Delete the retired shards ``names`` still in ``shards/`` (a link is never followed);
    how many went."""
    folder, deleted = store / SHARDS, 0
    present = listing(folder)
    for name in names:
        if name in present and present[name].kind == "file":
            location.delete(folder / name)
            deleted += 1
    return deleted


def current(state: State) -> bool:
    """True while no index entry has appeared (or gone) since ``state`` was read."""
    folder = state.store / INDEX
    names = sorted(n for n in listing(folder) if ENTRY_NAME.match(n))
    return names == [e.name for e in state.entries]


def attrs_of(state: State) -> dict:
    return {k: _plain(v) for k, v in (state.settings or {}).items()}


# -- what an update changes ------------------------------------------------------------------------

EMPTY = np.empty(0, np.int64)


@dataclass
class Changes:
    """An update of a store, as planned: the entries kept per source file (numbers), the
    inputs whose existing rows need a new shard (label or file identity changed), and failures
    to record.  ``scope``: the paths the update may change (None: all; an update of some
    units leaves every other path's entries alone)."""

    keep: dict[Where, np.ndarray]
    republish: list[int]                      # inputs
    failures: list[tuple[str, str, int]]      # (path, reason, input or −1)
    class_names: list[str] | None
    labelled: bool
    scope: set[str] | None = None

    def dropped(self, shard: Shard, file: Where) -> np.ndarray:
        """The live entries of ``shard`` (stored as ``file``) the update removes."""
        gone = shard.live.copy()
        gone[self.keep.get(file, EMPTY)] = False
        dead = np.flatnonzero(gone)
        if self.scope is None or not len(dead):
            return dead
        paths = map(shard.index.paths.__getitem__, dead.tolist())
        return dead[np.fromiter(map(self.scope.__contains__, paths), bool, len(dead))]

    def nothing_to_do(self, state: State) -> bool:
        live = {state.store / SHARDS / s.name: s for s in state.shards}
        if self.republish or self.failures or any(f not in live for f in self.keep):
            return False
        if any(len(self.dropped(s, f)) for f, s in live.items()):
            return False
        if self.scope is not None:
            return not self.labelled or set(self.class_names or ()) <= set(
                state.class_names or ())
        return (self.class_names, self.labelled) == (state.class_names, state.class_names
                                                     is not None)


def input_labels(images) -> list[str]:
    if images.labels is None:
        return [""] * len(images.paths)
    return [images.class_names[k] for k in images.labels]


def plan_changes(plan, state: State, images, scope: set[str] | None = None) -> Changes:
    """Which existing entries the update keeps, and what it must write anew (after
    ``plan.attach``: every input has a source); ``scope``: see :class:`Changes`."""
    labels = None if images.labels is None else np.asarray(images.class_names, object)[
        np.asarray(images.labels, np.int64)]
    cache = {}
    keep: dict[Where, np.ndarray] = {}
    republish, failures = [], []
    for k, at in groups(plan.source):  # the inputs of each source, in order
        source = plan.sources[k]
        e = plan.entry[at]
        same = ((plan.ids.size[at] == source.ids.size[e])
                & (plan.ids.mtime_ns[at] == source.ids.mtime_ns[e])
                & (plan.ids.sha256[at] == source.ids.sha256[e]).all(axis=1))
        is_row = e < source.n_rows
        labelled_same = np.ones(len(at), bool)
        if not plan.add:  # (an addition labels nothing: rows keep the labels they have)
            stored = label_names_of(source.file, state, cache)
            if stored is not None or labels is not None:
                mine = "" if labels is None else labels[at[is_row]]
                theirs = "" if stored is None else np.asarray(stored, object)[e[is_row]]
                labelled_same[is_row] = theirs == mine
        redo, refail = is_row & ~(same & labelled_same), ~is_row & ~same
        republish += at[redo].tolist()
        failures += [(plan.paths[i], source.reasons[x - source.n_rows], int(i))
                     for i, x in zip(at[refail], e[refail])]
        keep[source.file] = np.concatenate([keep.get(source.file, EMPTY), e[~redo & ~refail]])
    failed = state.live_failures()
    live_failed = {path: (state.store / SHARDS / state.shards[k].name, e, reason)
                   for path, k, e, reason in zip(failed.paths, failed.shard.tolist(),
                                                 failed.entry.tolist(),
                                                 failed.reasons(state.shards))}
    for path, reason in plan.extra_failed:
        found = live_failed.get(path)
        if found is not None and found[2] == reason:
            keep[found[0]] = np.append(keep.get(found[0], EMPTY), found[1])
        else:
            failures.append((path, reason, -1))
    if plan.add:
        _keep_the_others(keep, state, set(plan.paths) | {p for p, _ in plan.extra_failed})
        return Changes(keep, sorted(republish), failures, state.class_names,
                       state.class_names is not None)
    return Changes(keep, sorted(republish), failures, images.class_names,
                   images.labels is not None, scope)


def _keep_the_others(keep: dict[Where, np.ndarray], state: State, inputs: set[str]) -> None:
    """An addition keeps every live entry of a path that is not among its inputs."""
    for shard in state.shards:
        file = state.store / SHARDS / shard.name
        others = [e for e in np.flatnonzero(shard.live) if shard.index.paths[e] not in inputs]
        if others:
            keep[file] = np.concatenate([keep.get(file, EMPTY), np.array(others, np.int64)])


def publish_update(store: Where, state: State, plan, changes: Changes, images, *, dim: int,
                   n_scales: int, dtype: str, writer: dict | None = None,
                   units: dict[str, str] | None = None,
                   keep_units: list[str] | None = None) -> Entry:
    """Write the shards an update needs beyond its computed ones, then its index entry
    (recording ``units`` and ``keep_units``: see :class:`Entry`)."""
    folder = _folder(store, SHARDS, create=True)
    keep = dict(changes.keep)
    if changes.republish:
        labels = input_labels(images)
        picks = [(plan.sources[plan.source[i]].file, int(plan.entry[i]))
                 for i in changes.republish]
        written = copy_shard_rows(folder, shard_name("u"), picks,
                                  ids=plan.ids.take(changes.republish),
                                  paths=[plan.paths[i] for i in changes.republish],
                                  label_names=[labels[i] for i in changes.republish],
                                  dim=dim, n_scales=n_scales, dtype=dtype)
        keep[written] = np.arange(len(picks))
    if changes.failures:
        at = [i for _, _, i in changes.failures]
        ids = FileIds.concat([plan.ids.take([i]) if i >= 0 else FileIds.empty(1) for i in at])
        written = write_shard(folder, shard_name("u"), paths=[], ids=FileIds.empty(0),
                              features=np.empty((0, dim)), input_sizes=np.empty((0, n_scales, 2)),
                              failed_paths=[p for p, _, _ in changes.failures],
                              failed_reasons=[r for _, r, _ in changes.failures],
                              failed_ids=ids, dtype=dtype, label_names=[])
        keep[written] = np.arange(len(changes.failures))
    entry = _entry(state, keep, changes)
    entry.writer = None if writer is None else {k: str(writer[k]) for k in WRITER_KEYS}
    entry.units, entry.keep_units = dict(units or {}), keep_units
    publish_entry(store, entry)
    return entry


def _entry(state: State, keep: dict[Where, np.ndarray], changes: Changes) -> Entry:
    entry = Entry("", class_names=changes.class_names, labelled=changes.labelled)
    live = {state.store / SHARDS / s.name: s for s in state.shards}
    for file, shard in live.items():
        dead = changes.dropped(shard, file)
        if not shard.live.any() or len(dead) == np.count_nonzero(shard.live):
            entry.retired.append(shard.name)
        elif len(dead):
            entry.removed[shard.name] = dead.tolist()
    for file, kept in keep.items():
        if file in live:
            continue
        with open_h5(file) as f:
            n_rows, n_failed = len(f["paths"]), len(f["failed/paths"])
        entry.added[file.name] = [n_rows, n_failed, location.size(file)]
        unused = np.setdiff1d(np.arange(n_rows + n_failed), kept).tolist()
        if unused:  # rows of a killed run no input needs: never live
            entry.removed[file.name] = unused
    return entry


# -- compaction ------------------------------------------------------------------------------------

@dataclass
class Compaction:
    rewritten: int      # shards whose live entries were copied into new shards
    retired: int        # shard files deleted
    new_shards: int
    bytes_before: int
    bytes_after: int


def _duplicate(shard: Where, state: State) -> bool:
    """An unlisted shard all of whose rows the store holds live with the same content (the
    loser of two writers that raced on a unit): nothing would be lost by deleting it.  A killed
    run's shard, with rows the store lacks, is kept for the next update to reuse."""
    from .store import read_index

    try:
        index = read_index(shard)
    except (OSError, CacheError):
        return False
    live = state.live_hashes()
    return all(live.get(p) == index.ids.sha256[e].tobytes()
               for e, p in enumerate(index.paths[:index.n_rows])) and not index.reasons


def compact(store: Where, *, threshold: float = COMPACT_DEAD_FRACTION) -> Compaction:
    """Rewrite the live entries of shards at least ``threshold`` dead, and of small shards
    once there are :data:`PACK_SMALL_SHARDS` of them, into new shards of at most
    :data:`COMPACT_SHARD_BYTES`; retire the old ones in one index entry, then delete retired
    files, and unlisted shards whose rows the store holds already.  Crash-safe: until the entry
    is published the new shards are unlisted (and deleted by the next compaction); after it the
    old files are only garbage (deleted by the next compaction).  Call it holding the store's
    lock."""
    state = read_store(store)
    folder = _folder(store, SHARDS)
    for leftover in unlisted_shards(store, state):
        if leftover.name.startswith("shard-c-") or _duplicate(leftover, state):
            location.delete(leftover)
    before = sum(s.bytes for s in state.shards)
    victims = [s for s in state.shards if len(s.live) == 0 or 1 - s.live.mean() >= threshold]
    small = [s for s in state.shards if s.bytes < SMALL_SHARD_BYTES and s not in victims]
    if len(small) >= PACK_SMALL_SHARDS:
        victims += small
    written = _rewrite(state, [s for s in victims if s.live.any()], folder)
    if victims:
        entry = Entry("", class_names=state.class_names, labelled=state.class_names is not None,
                      retired=[s.name for s in victims], writer=state.writer)
        for path in written:
            with open_h5(path) as f:
                entry.added[path.name] = [len(f["paths"]), len(f["failed/paths"]),
                                          location.size(path)]
        publish_entry(store, entry)
    deleted = delete_shards(store, state.retired | {s.name for s in victims})
    after = sum(s.bytes for s in read_state(store).shards)
    return Compaction(len(victims), deleted, len(written), before, after)


def _rewrite(state: State, shards: list[Shard], folder: Where) -> list[Where]:
    """The live entries of ``shards`` in new shards of at most COMPACT_SHARD_BYTES each."""
    number = {s.name: k for k, s in enumerate(state.shards)}
    numbered = [(number[s.name], s) for s in shards]
    rows, failed = Entries.of_live(numbered), Entries.of_live(numbered, failures=True)
    if not rows and not failed:
        return []
    dim, dtype = _shape(state)
    n_scales = len((state.settings or {}).get("scales", [1]))
    per_shard = max(1, COMPACT_SHARD_BYTES // (dim * np.dtype(dtype).itemsize + 256))
    written = []
    for lo in range(0, max(len(rows), 1), per_shard):
        chunk = rows[lo:lo + per_shard]
        fails = failed if lo == 0 else failed[:0]
        written.append(_copy_entries(folder, state, chunk, fails, dim=dim, n_scales=n_scales,
                                     dtype=dtype))
    return written


def _copy_entries(folder: Where, state: State, rows, failed, *, dim, n_scales, dtype) -> Where:
    """A new shard of existing entries, rows and failures."""
    shards = state.shards
    feats = np.empty((len(rows), dim), dtype)
    sizes = np.empty((len(rows), n_scales, 2), np.int32)
    if len(rows):
        copy_rows(Rows([state.store / SHARDS / s.name for s in shards], rows.shard, rows.entry),
                  feats, sizes, block=len(rows))
    return write_shard(
        folder, shard_name("c"), paths=rows.paths, ids=_ids_of(state, rows),
        features=feats, input_sizes=sizes, failed_paths=failed.paths,
        failed_reasons=failed.reasons(shards), failed_ids=_ids_of(state, failed), dtype=dtype,
        label_names=[shards[k].label_names[e] for k, e in zip(rows.shard.tolist(),
                                                               rows.entry.tolist())])


# -- export and description ------------------------------------------------------------------------

def export_file(store: Where, output: Path, *, overwrite: bool = False) -> int:
    """Write the store's live rows (sorted by path) as one feature file; the number of rows.
    Its attributes are an extract output's: the settings, what the latest entry records of its
    writer (weights source, versions), and ``created`` (the export's time)."""
    from .store import check_suffix, check_writable, write_features

    check_suffix(output, "export file")
    check_export_target(store, output, overwrite)
    check_writable(output)
    state = read_state(store)
    if state.settings is None:
        raise CacheError(f"{store} is not a vggfeat feature store (no {SETTINGS})")
    writer = state.writer or dict.fromkeys(WRITER_KEYS, "unknown (an earlier vggfeat)")
    rows, failures = state.live_rows(), state.live_failures()
    shards = state.shards
    files = [store / SHARDS / s.name for s in shards]
    dim, dtype = _shape(state)
    ids = _ids_of(state, rows)
    targets = _targets(state, rows)
    write_features(
        output, Rows(files, rows.shard, rows.entry), paths=rows.paths, ids=ids, labels=targets,
        class_names=state.class_names, failed_paths=failures.paths,
        failed_reasons=failures.reasons(shards), failed_ids=_ids_of(state, failures),
        attrs={**attrs_of(state), **writer, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "complete": True}, dim=dim,
        n_scales=len((state.settings or {}).get("scales", [1])), dtype=dtype)
    return len(rows)


def check_export_target(store: Where, output: Path, overwrite: bool) -> None:
    """An export never writes into the store, nor replaces a file unasked."""
    if not is_remote(store) and output.resolve().is_relative_to(store.resolve()):
        raise CacheError(f"{output} is inside the feature store {store}: a store holds only "
                         "the files vggfeat writes there; choose a path outside it")
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise CacheError(f"{output} already exists: pass --overwrite to replace it, or choose "
                         "another name")


def _ids_of(state: State, entries: Entries) -> FileIds:
    """The file identities of ``entries``, gathered per shard."""
    ids = FileIds.empty(len(entries))
    entry = entries.entry
    for k, at in groups(entries.shard):
        source = state.shards[k].index.ids
        ids.size[at], ids.mtime_ns[at] = source.size[entry[at]], source.mtime_ns[entry[at]]
        ids.sha256[at] = source.sha256[entry[at]]
    return ids


def describe(store: Where) -> list[str]:
    """What ``vggfeat store info`` prints."""
    state = read_state(store)
    if state.settings is None:
        raise CacheError(f"{store} is not a vggfeat feature store (no {SETTINGS})")
    live_bytes = sum(s.bytes * s.live.mean() for s in state.shards if len(s.live))
    total = sum(s.bytes for s in state.shards)
    unlisted = unlisted_shards(store, state)
    present = listing(store / SHARDS)
    leftover = [n for n in state.retired if n in present]
    settings = state.settings
    lines = [f"store       {store}",
             f"rows        {len(state.live_rows())} live, {len(state.live_failures())} failed",
             f"shards      {len(state.shards)} live ({total / 2**20:.1f} MiB: "
             f"{live_bytes / 2**20:.1f} live, {(total - live_bytes) / 2**20:.1f} dead); "
             f"{len(state.entries)} index entries",
             f"settings    arch {settings.get('arch')}, layer {settings.get('layer')}, scales "
             f"{settings.get('scales')}, aggregate {settings.get('aggregate')}, dtype "
             f"{settings.get('dtype')}, weights {settings.get('weights')}",
             f"classes     {len(state.class_names) if state.class_names else 'none'}"]
    if unlisted:
        lines.append(f"unlisted    {len(unlisted)} shard(s) of a killed or running update "
                     "(reused by the next update of the same inputs)")
    if leftover:
        lines.append(f"retired     {len(leftover)} shard file(s) still on disk (vggfeat store "
                     "compact deletes them)")
    lines += _sub_store_lines(store)
    foreign = foreign_files(store)
    if foreign:
        shown = ", ".join(str(p) for p in foreign[:5])
        lines.append(f"foreign     {len(foreign)} file(s) vggfeat did not write, ignored: {shown}"
                     + (" …" if len(foreign) > 5 else ""))
    return lines


def _sub_store_lines(store: Where) -> list[str]:
    """One line per further setting (a VGGFeatures cache's sub-store ``alt/NAME``)."""
    from .settings import sub_stores

    lines = []
    for sub in sub_stores(store):
        settings, attrs = read_settings(sub) or {}, store_attrs(sub)
        lines.append(f"also        {ALT}/{sub.name}: layer {settings.get('layer')}, scales "
                     f"{settings.get('scales')}, aggregate {settings.get('aggregate')}; "
                     f"{attrs['num_images']} rows, {attrs['num_failed']} failed (load_features("
                     f"STORE, group={sub.name!r}))")
    return lines
