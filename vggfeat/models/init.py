"""Initialisation schemes of Sect. 3.1.

* ``paper``: weights from a zero-mean normal with std 0.01, biases 0.  The text says "10⁻²
  variance" (std 0.1); std 0.01 is what the released Caffe prototxts and most reproductions use,
  and with std 0.1 the 11-layer net's activations overflow.  The std is a parameter.
* ``glorot``: Glorot/Xavier uniform weights, biases 0 (the authors' later finding: no pre-training
  needed).
* ``kaiming``: torchvision's scheme (He normal, fan-out, for convs; N(0, 0.01) for fc layers).
* Pre-initialisation from a trained net A (:func:`preinit_from_a`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, WeightsError
from .vgg import VGG, DenseLinear

SCHEMES = ("paper", "glorot", "kaiming")
# Layers of net A copied into a deeper net, by name.  Net A's first four convs are conv1_1,
# conv2_1, conv3_1 and conv3_2; each deeper config has a layer of that name and shape.
PREINIT_LAYERS = ("conv1_1", "conv2_1", "conv3_1", "conv3_2", "fc6", "fc7", "fc8")


def init_weights(model: VGG, scheme: str = "glorot", *, seed: int | None = None,
                 std: float = 0.01) -> VGG:
    """Re-initialise every conv/fc/bn parameter of ``model`` in place; returns ``model``.

    ``seed`` makes the result reproducible independently of the global RNG.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown init scheme {scheme!r}; valid choices: {', '.join(SCHEMES)}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, DenseLinear)):
                is_fc = isinstance(module, DenseLinear)
                if scheme == "paper" or (scheme == "kaiming" and is_fc):
                    nn.init.normal_(module.weight, 0.0, std, generator=gen)
                elif scheme == "glorot":
                    _glorot_uniform(module.weight, gen, is_fc=is_fc)
                else:
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu",
                                            generator=gen)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
    return model


def _glorot_uniform(weight: torch.Tensor, gen: torch.Generator | None, *, is_fc: bool) -> None:
    # A conv's fan_out counts every output position a weight reaches: out_channels·k·k (Glorot &
    # Bengio; Caffe's and Keras' xavier).  An fc layer stored as a k×k conv is a Linear: fc6 is
    # 25088 → 4096, so its fan_out is out_features alone.
    fan_in = weight[0].numel()
    fan_out = weight.shape[0] if is_fc else weight.shape[0] * weight[0, 0].numel()
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    nn.init.uniform_(weight, -bound, bound, generator=gen)


def preinit_from_a(model: VGG, net_a: VGG | dict[str, torch.Tensor]) -> list[str]:
    """Copy conv1_1, conv2_1, conv3_1, conv3_2 and fc6–fc8 of a trained net A into ``model``.

    This is the paper's pre-initialisation of the deeper nets (B–E); the other layers keep their
    current (random) values.  ``net_a`` is a VGG "A" or its vggfeat state dict.  Returns the
    parameter names copied.
    """
    source = net_a.state_dict() if isinstance(net_a, VGG) else net_a
    target = model.state_dict()
    copied = []
    for layer in PREINIT_LAYERS:
        prefix = ("head." if layer.startswith("fc") else "features.") + layer + "."
        for key in [k for k in source if k.startswith(prefix)]:
            if key not in target or target[key].shape != source[key].shape:
                raise WeightsError(f"cannot pre-initialise {key} of VGG {model.spec.name} from net A:"
                                 f" shapes {tuple(source[key].shape)} vs "
                                 f"{tuple(target[key].shape) if key in target else 'absent'}")
            target[key] = source[key].clone()
            copied.append(key)
    if not copied:
        raise WeightsError("the given net A has none of conv1_1, conv2_1, conv3_1, conv3_2, fc6–fc8")
    model.load_state_dict(target)
    return copied
