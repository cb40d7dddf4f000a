"""The VGG family of Table 1: configs, network, initialisation, weights and their conversion.

The configs (:mod:`.configs`, plain data) come at once; every other name is imported on first
use, so checking an arch or layer name (the command line's ``--help`` and argument errors) does
not load torch.
"""

# Private names: ``dir(vggfeat.models)`` shows the library, not the modules this file uses.
import importlib as _importlib
import sys as _sys
import types as _types

from .configs import CFGS, ArchSpec, parse_arch

_LAZY = {"detect_format": "convert", "infer_config": "convert", "to_torchvision": "convert",
         "to_vggfeat": "convert", "vgg": "factory", "NewHeadWarning": "factory",
         "freeze": "finetune", "init_weights": "init", "preinit_from_a": "init",
         "CAFFE": "preprocessing", "IMAGENET": "preprocessing", "PAPER": "preprocessing",
         "Preprocessing": "preprocessing", "get_preprocessing": "preprocessing",
         "count_macs": "stats", "count_params": "stats", "weight_layers": "stats", "VGG": "vgg",
         "score_map_size": "vgg", "PRETRAINED": "weights", "pretrained_table": "weights",
         "WeightsError": "weights", "read_weights_file": "weights", "save_weights": "weights"}

__all__ = ["CFGS", "ArchSpec", "parse_arch", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:  # a submodule (vggfeat.models.stats …), imported on first use
        try:
            return _importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(_importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    public = {n for n in globals() if not n.startswith("_") or n.startswith("__")}
    return sorted(public | set(_LAZY))


class _Models(_types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        # Importing the submodule vggfeat.models.vgg binds it as an attribute of this package;
        # the builder vggfeat.models.vgg() keeps the name, as it did when everything was imported.
        if name == "vgg" and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Models
