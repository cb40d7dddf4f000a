"""vggfeat: the VGG family of Simonyan & Zisserman (ICLR 2015), faithfully, with dense features.

The public names are imported on first use, so ``import vggfeat`` (and the command line's
``--help``) does not pay for torch until something needs it.
"""

# Private names: ``dir(vggfeat)`` shows the library, not the modules this file uses.
import importlib as _importlib
import sys as _sys
import types as _types

__version__ = "0.1.0"

_LAZY = {"VGG": "models", "DescriptorSpec": "extract", "NewHeadWarning": "models",
         "Preprocessing": "models", "VGGFeatError": "errors", "WeightsError": "errors",
         "extract": "extract", "load_features": "cache", "save_weights": "models", "vgg": "models",
         "image_folder": "data.folders"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:  # a subpackage (vggfeat.models …), imported on first use
        try:
            return _importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'vggfeat' has no attribute {name!r}") from None
    value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    public = {n for n in globals() if not n.startswith("_") or n.startswith("__")}
    return sorted(public | set(_LAZY))


class _Package(_types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the subpackage vggfeat.extract binds it as an attribute of vggfeat; the
        # function vggfeat.extract() keeps the name, as it did when everything was imported.
        if name == "extract" and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
