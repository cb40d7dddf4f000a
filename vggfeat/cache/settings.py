"""Where one descriptor setting lives in a feature file or a store.

A ``.h5`` file holds one setting's rows at its root (the layout ``vggfeat extract`` writes) and
any further settings in named groups of the same layout, each named :func:`setting_name`.  A
store holds one setting in its own folders and any further ones in sub-stores
``STORE/alt/NAME/``, each a store of its own.  ``VGGFeatures(cache=…)`` and ``vggfeat extract``
find a setting the same way, so an extract output is a cache and a cache is an extract output.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import h5py

if TYPE_CHECKING:
    from .location import Where

# Settings that must agree for descriptors to be comparable, and so for rows to be reused.
DESCRIPTOR_SETTINGS = ("arch", "model_config", "weights", "weights_sha256", "preprocessing", "layer",
                       "scales", "pool", "aggregate", "flip", "l2", "crop", "max_aspect", "dtype")
ALT = "alt"  # a store's folder of sub-stores, one per further setting


def settings_of(attrs) -> dict:
    """The descriptor settings among ``attrs`` (HDF5 attributes, or a store's settings)."""
    from .store import _plain

    return {k: _plain(attrs.get(k)) for k in DESCRIPTOR_SETTINGS}


def setting_name(settings: dict) -> str:
    """``fc7-<12 hex>``: the layer and a hash of every setting (the name of its group)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return f"{str(settings.get('layer')).replace(':', '_')}-{digest[:12]}"


def setting_groups(f: h5py.File) -> list[str]:
    """Every group of ``f`` holding rows: ``/`` first when the root does, then named groups."""
    named = sorted(n for n, g in f.items() if isinstance(g, h5py.Group) and "features" in g)
    return (["/"] if "features" in f else []) + named


def file_group(f: h5py.File, settings: dict) -> str | None:
    """The group of ``f`` holding ``settings`` (the root first), or None."""
    wanted = settings_of(settings)
    return next((g for g in setting_groups(f) if settings_of(f[g].attrs) == wanted), None)


def named_group(f: h5py.File, name: str) -> str | None:
    """The group a setting's name designates: a group of that name, or the root when the root
    holds that setting (a cache whose first setting went to the root)."""
    if name in f and isinstance(f[name], h5py.Group) and "features" in f[name]:
        return name
    if "features" in f and setting_name(settings_of(f.attrs)) == name:
        return "/"
    return None


def new_group(f: h5py.File | None, settings: dict) -> str:
    """Where a setting not yet in ``f`` goes: the root of a new file, else a named group."""
    return "/" if f is None else setting_name(settings)


def sub_stores(store: Where) -> list[Where]:
    """The sub-stores of further settings of ``store`` (folders of ``alt/``, sorted; a link
    is never followed)."""
    from .location import is_remote, listing

    folder = store / ALT
    if not is_remote(folder) and folder.is_symlink():
        return []
    return sorted(folder / n for n, found in listing(folder).items()
                  if found.kind == "folder" and not n.startswith("."))


def store_for(store: Where, settings: dict) -> Where:
    """The store holding ``settings``: ``store`` itself when it holds them or none yet, else
    its sub-store ``alt/<setting_name>`` (which may not exist yet)."""
    from .sharded import read_settings

    own = read_settings(store)
    if own is None or settings_of(own) == settings_of(settings):
        return store
    return store / ALT / setting_name(settings)


def named_store(store: Where, name: str) -> Where | None:
    """The store a setting's name designates: ``store`` when it holds that setting, or its
    sub-store of that name; None when neither exists."""
    from .sharded import read_settings

    own = read_settings(store)
    if own is not None and setting_name(settings_of(own)) == name:
        return store
    sub = store / ALT / name
    return sub if sub in sub_stores(store) else None
