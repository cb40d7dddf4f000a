"""vggfeat: the VGG family of Simonyan & Zisserman (ICLR 2015), faithfully, with dense features.

The public names are imported on first use, so ``import vggfeat`` (and the command line's
``--help``) does not pay for torch until something needs it.
"""

# Private names, so that dir() shows the library's names only.
from ._lazy import lazy_names as _lazy_names

__version__ = "0.1.0"

_LAZY = {"VGG": "models", "DescriptorSpec": "descriptors", "NewHeadWarning": "models",
         "Preprocessing": "models", "VGGFeatError": "errors", "WeightsError": "errors",
         "extract": "descriptors", "load_features": "cache", "save_weights": "models", "vgg": "models",
         "image_folder": "data.folders", "iter_features": "cache",
         "extract_with_ray": "engines.ray"}
__all__ = ["__version__", *_LAZY]


__getattr__, __dir__ = _lazy_names(__name__, _LAZY)
