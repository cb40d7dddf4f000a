"""Engines: other drivers of a feature store's units of work (:mod:`vggfeat.data.units`).

Each unit is computed by ``vggfeat.descriptors.extract(…, only_units=(id,))`` wherever the
engine runs it, and published into the store by whoever computed it; the engine only hands the
units out.  ``extract_with_ray`` (``vggfeat extract --engine ray``) hands them to the actors of a
Ray cluster (docs/scale.md).
"""

from .._lazy import lazy_names as _lazy_names

_LAZY = {"extract_with_ray": "ray"}
__all__ = list(_LAZY)

__getattr__, __dir__ = _lazy_names(__name__, _LAZY)
