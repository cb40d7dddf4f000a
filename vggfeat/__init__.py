"""vggfeat: the VGG family of Simonyan & Zisserman (ICLR 2015), faithfully, with dense features."""

__version__ = "0.1.0"

from .cache import load_features
from .extract import DescriptorSpec, extract
from .models import VGG, Preprocessing, WeightsError, save_weights, vgg

__all__ = ["__version__", "VGG", "DescriptorSpec", "Preprocessing", "WeightsError", "extract",
           "load_features", "save_weights", "vgg"]
