"""Crash-safe HDF5 feature caches: shards while running, one file when done, and their readers."""

from .sharded import iter_features
from .store import CacheError, load_features, read_attrs

__all__ = ["CacheError", "iter_features", "load_features", "read_attrs"]
