"""Fine-tuning a pretrained VGG: which layers stay fixed.

A new head on pretrained weights comes from :func:`vggfeat.vgg` (``num_classes=K`` keeps
conv1_1 … fc7 and initialises fc8 anew).  :func:`freeze` then fixes the layers that are not to be
trained: none, the conv layers, or every layer up to a named one.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .vgg import PRE, VGG

# ``freeze`` also takes any layer name of the net (conv4_3, pool5, fc6 …).
FREEZE_CHOICES = ("none", "conv")


def freeze(model: VGG, upto: str = "conv") -> list[str]:
    """Fix the parameters of ``model`` up to and including the layer ``upto``, in place.

    Args:
        upto: ``"none"`` (train everything), ``"conv"`` (every conv layer, through pool5: train
            fc6–fc8), or a layer name such as ``"conv4_3"`` or ``"fc7"`` (that layer and every
            one before it; ``"fc7"`` leaves only fc8 to train, a linear classifier on fixed fc7).

    Frozen parameters get ``requires_grad=False``.  Batch norm in the frozen part is replaced by
    torchvision's ``FrozenBatchNorm2d`` holding the same statistics, so ``model.train()`` no
    longer updates them.  Returns the names of the frozen parameters.
    """
    if upto == "none":
        return []
    last = _last_frozen_module(model, upto)
    names = [name for name, _ in model._modules_in_order[:last + 1]]
    _freeze_batch_norm(model, names)
    frozen = []
    for name, module in model._modules_in_order[:last + 1]:
        prefix = ("features." if name in model.features._modules else "head.") + name
        for param_name, param in module.named_parameters(prefix=prefix):
            param.requires_grad_(False)
            frozen.append(param_name)
    return frozen


def _last_frozen_module(model: VGG, upto: str) -> int:
    if upto == "conv":
        return len(model.features) - 1
    if upto in ("fc8", "prob") or upto.endswith(PRE):
        raise ConfigError(f"cannot freeze up to {upto!r}: name a layer before fc8 "
                          f"({', '.join(FREEZE_CHOICES)}, conv1_1 … fc7)")
    if upto not in model._taps:
        raise ConfigError(f"freeze must be {', '.join(FREEZE_CHOICES)} or a layer of VGG "
                          f"{model.spec.name} before fc8, got {upto!r}; layers: "
                          + ", ".join(n for n in model.layer_names
                                      if not n.endswith(PRE) and n not in ("fc8", "prob")))
    return model._taps[upto]


def _freeze_batch_norm(model: VGG, names: list[str]) -> None:
    from torchvision.ops import FrozenBatchNorm2d

    for name in names:
        module = model.features._modules.get(name)
        if isinstance(module, nn.BatchNorm2d):
            fixed = FrozenBatchNorm2d(module.num_features, eps=module.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(fixed, key).copy_(getattr(module, key).detach())
            fixed.to(module.weight.device)
            model.features.set_submodule(name, fixed)  # same name: the layer index holds
