"""The VGG family of Table 1: configs, network, initialisation, weights and their conversion."""

from .configs import CFGS, ArchSpec, parse_arch
from .convert import detect_format, infer_config, to_torchvision, to_vggfeat
from .factory import NewHeadWarning, vgg
from .finetune import freeze
from .init import init_weights, preinit_from_a
from .preprocessing import CAFFE, IMAGENET, PAPER, Preprocessing, get_preprocessing
from .stats import count_macs, count_params, weight_layers
from .vgg import VGG, score_map_size
from .weights import PRETRAINED, WeightsError, read_weights_file, save_weights

__all__ = ["CFGS", "ArchSpec", "parse_arch", "detect_format", "infer_config", "to_torchvision",
           "to_vggfeat", "vgg", "NewHeadWarning", "freeze", "init_weights", "preinit_from_a",
           "CAFFE", "IMAGENET", "PAPER", "Preprocessing", "get_preprocessing", "count_macs", "count_params", "weight_layers", "VGG",
           "score_map_size", "PRETRAINED", "WeightsError", "read_weights_file", "save_weights"]
