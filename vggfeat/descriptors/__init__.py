"""Layer-wise descriptors with the paper's dense multi-scale pooling, cached resumably."""

from .descriptor import DescriptorNet, DescriptorSpec, prepare
from .run import ExtractError, ExtractOptions, ExtractResult, extract

__all__ = ["DescriptorNet", "DescriptorSpec", "prepare", "ExtractError", "ExtractOptions",
           "ExtractResult", "extract"]
