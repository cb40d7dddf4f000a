"""Packages whose public names are imported on first use, so that ``import vggfeat`` and the
command line's ``--help`` do not pay for torch until something needs it."""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable


def lazy_names(package: str, table: dict[str, str]) -> tuple[Callable, Callable]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``table`` maps each public name to the
    submodule (relative to ``package``) that defines it; other names are submodules."""
    namespace = vars(sys.modules[package])

    def __getattr__(name: str):
        if name not in table:  # a submodule, imported on first use
            try:
                return importlib.import_module(f".{name}", package)
            except ModuleNotFoundError as err:
                if err.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(f".{table[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        public = {n for n in namespace if not n.startswith("_") or n.startswith("__")}
        return sorted(public | set(table))

    return __getattr__, __dir__


def keep_function_name(package: str, name: str) -> None:
    """Keep ``package.name`` the function of that name when the submodule ``package.name`` is
    imported (Python binds a submodule as an attribute of its package)."""

    class Package(types.ModuleType):
        def __setattr__(self, attribute: str, value) -> None:
            if attribute == name and isinstance(value, types.ModuleType):
                return
            super().__setattr__(attribute, value)

    sys.modules[package].__class__ = Package
