"""Units of work: fixed pieces of the input that processes share without talking to each other.

A unit is one tar, one Parquet row group, or a fixed-size run (:data:`~vggfeat.choices.UNIT_IMAGES`
images) of a folder listing or URL list.  Its id does not depend on how many processes run, so
``--num-shards N --shard-index I`` (or a Slurm array, or torchrun's ranks) can split the units
by id alone, and a rerun recognises each unit by id.  A unit's *fingerprint* sums up the inputs
it was computed from (file sizes and times, a tar's ETag, …): a store records it with the unit's
rows, and a unit whose fingerprint is unchanged is skipped without reading its images.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from itertools import repeat

from ..choices import UNIT_IMAGES
from ..errors import ConfigError
from .sources import ImageList


@dataclass(frozen=True)
class Unit:
    """Images ``start:stop`` of an :class:`ImageList` (streamed inputs have their own units:
    :class:`vggfeat.data.streams.StreamUnit`)."""

    id: str
    start: int = 0
    stop: int = 0


def file_units(images: ImageList, size: int = UNIT_IMAGES) -> list[Unit]:
    """Runs of ``size`` images of ``images``, in order."""
    return [Unit(f"files:{k // size:08d}", k, min(k + size, len(images)))
            for k in range(0, len(images), size)]


def files_fingerprint(images: ImageList, unit: Unit, size, mtime_ns) -> str:
    """SHA-256 of the unit's paths, labels and file sizes and times (``size``/``mtime_ns``:
    per image of the unit, in order)."""
    n = unit.stop - unit.start
    labels = (map(images.class_names.__getitem__, images.labels[unit.start:unit.stop])
              if images.labels is not None else repeat("", n))
    lines = map("{}\t{}\t{}\t{}\n".format, images.paths[unit.start:unit.stop], labels,
                map(int, size[:n]), map(int, mtime_ns[:n]))
    return hashlib.sha256("".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(frozen=True)
class WorkShare:
    """This process's share of the units: those whose position ``k`` has
    ``k % count == index``."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ConfigError(f"--shard-index must be in 0..{self.count - 1} for --num-shards "
                              f"{self.count}, got {self.index}")

    @property
    def first(self) -> bool:
        """The first process also records what no unit holds any more (removals)."""
        return self.index == 0

    def mine(self, units: list[Unit]) -> list[Unit]:
        return units[self.index::self.count]

    @classmethod
    def resolve(cls, count: int | None = None, index: int | None = None) -> WorkShare:
        """Given values, else a Slurm array's (``SLURM_ARRAY_TASK_ID`` minus
        ``SLURM_ARRAY_TASK_MIN``, ``SLURM_ARRAY_TASK_COUNT``), else torchrun's (``RANK``,
        ``WORLD_SIZE``), else the whole input."""
        env = os.environ
        if count is None and "SLURM_ARRAY_TASK_COUNT" in env:
            count = _int_env("SLURM_ARRAY_TASK_COUNT")
            index = index if index is not None else _slurm_index(count)
        elif count is None and int(env.get("WORLD_SIZE", "1")) > 1:
            count, index = _int_env("WORLD_SIZE"), (index if index is not None
                                                    else _int_env("RANK"))
        if count is not None and index is None:
            raise ConfigError(f"--num-shards {count} needs --shard-index (0..{count - 1})")
        if count is None and index is not None:
            raise ConfigError("--shard-index needs --num-shards")
        return cls(index or 0, count or 1)


def _slurm_index(count: int) -> int:
    """This task's position in its array: (ID − MIN) / STEP for ``--array=MIN-MAX[:STEP]``.
    A list such as ``--array=1,4,7`` gives no position: it is refused."""
    offset = _int_env("SLURM_ARRAY_TASK_ID") - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    step = int(os.environ.get("SLURM_ARRAY_TASK_STEP", "1") or "1")
    index, rest = divmod(offset, max(step, 1))
    if rest or not 0 <= index < count:
        first = int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        raise ConfigError(f"Slurm array task {os.environ['SLURM_ARRAY_TASK_ID']} is not one of "
                          f"the {count} tasks {first}, {first + step}, … that "
                          "SLURM_ARRAY_TASK_MIN/STEP/COUNT describe (a list such as --array=1,4,7 "
                          "has no such form): use --array=0-N (or MIN-MAX:STEP), or give "
                          "--num-shards and --shard-index yourself")
    return index


def _int_env(name: str) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError) as err:
        raise ConfigError(f"environment variable {name}={os.environ.get(name)!r} is not a "
                          "whole number") from err
