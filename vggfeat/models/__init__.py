"""The VGG family of Table 1: configs, network, initialisation, weights and their conversion.

The configs (:mod:`.configs`, plain data) come at once; every other name is imported on first
use, so checking an arch or layer name (the command line's ``--help`` and argument errors) does
not load torch.
"""

# Private names, so that dir() shows the library's names only.
from .._lazy import keep_function_name as _keep_function_name
from .._lazy import lazy_names as _lazy_names
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


__getattr__, __dir__ = _lazy_names(__name__, _LAZY)
_keep_function_name(__name__, "vgg")
