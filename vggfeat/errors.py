"""The library's user-facing errors.

Every error raised because of what the user asked for (a path, an argument, a file, a cache, a
recipe) derives from :class:`VGGFeatError`.  The CLI turns exactly these into a one-line message;
anything else is a bug and keeps its traceback.

Classes that replaced a ``ValueError`` also derive from ``ValueError``, so code that caught the
old type keeps working.
"""

from __future__ import annotations

__all__ = ["VGGFeatError", "InputError", "ConfigError", "CacheError", "WeightsError",
           "ExtractError", "TrainingError", "RecipeError", "MissingDependencyError"]


class VGGFeatError(Exception):
    """Base of all vggfeat user errors; the message names the culprit and says what to do.

    ``exit_code`` is the command line's exit status for it: 2 for a request that cannot be
    served (bad input), 1 for a run that started and had to stop.
    """

    exit_code = 2


class InputError(VGGFeatError, ValueError):
    """An input path, list or argument value that cannot be used."""


class ConfigError(VGGFeatError, ValueError):
    """A model or descriptor setting that is not valid (unknown architecture, bad scale, ...)."""


class RecipeError(VGGFeatError, ValueError):
    """A recipe file or override that cannot be used; the message names the key and the file."""


class CacheError(VGGFeatError, RuntimeError):
    """An output cache that cannot be used as asked; the message says why and what to do."""


class WeightsError(VGGFeatError, RuntimeError):
    """Weights could not be found, fetched or trusted; the message says what to do."""


class ExtractError(VGGFeatError, RuntimeError):
    """An extraction run cannot go on (``--strict`` and a bad image, say); finished work is kept."""

    exit_code = 1


class TrainingError(VGGFeatError, RuntimeError):
    """A training run stopped (non-finite loss, say); the last good checkpoint is intact."""

    exit_code = 1


class MissingDependencyError(VGGFeatError, ImportError):
    """An optional package a feature needs is not installed; the message names the extra."""
