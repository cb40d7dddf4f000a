"""Packages only some commands need (``pip install "vggfeat[train]"``, ``[plot]``, ``[devkit]``,
``[parquet]``, ``[remote]`` for s3:// and http(s):// inputs, ``[gcs]`` for gs:// ones, ``[ray]``
for ``vggfeat extract --engine ray``)."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module``, or say which extra installs it: ``what`` names the feature."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        raise MissingDependencyError(f"{what} needs {package}, which is not installed: "
                                     f"pip install \"vggfeat[{extra}]\" (or pip install "
                                     f"{package})") from err
