"""Table 2 figures computed from a built net: weight layers, parameters, multiply-accumulates."""

from __future__ import annotations

from torch import nn

from .vgg import VGG, DenseLinear


def count_params(model: VGG) -> int:
    """Weights + biases (+ batch-norm affine parameters); buffers are not counted."""
    return sum(p.numel() for p in model.parameters())


def weight_layers(model: VGG) -> int:
    """Conv and fc layers: 11 for A … 19 for E, as the paper counts depth."""
    return sum(isinstance(m, (nn.Conv2d, DenseLinear)) for m in model.modules())


def count_macs(model: VGG, size: int = 224) -> int:
    """Multiply-accumulates of one forward pass on a size×size input (conv and fc layers only)."""
    shapes = model.layer_shapes((size, size))
    macs, in_ch = 0, 3
    for name, module in model.features.named_children():
        if isinstance(module, nn.Conv2d):
            c, h, w = shapes[name]
            macs += h * w * c * in_ch * module.kernel_size[0] * module.kernel_size[1]
            in_ch = c
    for name in ("fc6", "fc7", "fc8"):
        weight = getattr(model.head, name).weight
        c, h, w = shapes[name]
        macs += h * w * weight.numel()
    return macs
