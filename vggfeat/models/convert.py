"""Every foreign checkpoint layout is translated to vggfeat's here, and only here.

Layouts recognised:

* ``vggfeat``: ``features.conv1_1.weight`` … ``head.fc8.weight`` (fc layers as convs).
* ``torchvision``: ``features.<i>.weight`` and ``classifier.{0,3,6}.weight`` (fc layers Linear).
* ``timm``: ``features.<i>.weight``, ``pre_logits.fc{1,2}.weight`` (convs), ``head.fc.weight``.
* ``caffe``: Caffe layer names at the top level, ``conv1_1.weight`` … ``fc8.weight`` (fc Linear),
  as written by Caffe-to-PyTorch converters of VGG_ILSVRC_{16,19}_layers.

torchvision and timm number the ``features`` modules the way vggfeat orders its named ones
(conv, [bn], relu, …, pool), so index ``i`` maps to the ``i``-th named module.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from ..errors import InputError

from .configs import CFGS, FC_DIM, NUM_CLASSES, parse_arch
from .vgg import VGG

FC_NAMES = ("fc6", "fc7", "fc8")
TORCHVISION_FC = {"classifier.0": "fc6", "classifier.3": "fc7", "classifier.6": "fc8"}
TIMM_FC = {"pre_logits.fc1": "fc6", "pre_logits.fc2": "fc7", "head.fc": "fc8"}


def detect_format(state_dict: dict[str, Tensor]) -> str:
    """Name the layout of a VGG state dict; ``ValueError`` if it is none of the known ones."""
    keys = set(state_dict)
    if "head.fc6.weight" in keys or "features.conv1_1.weight" in keys:
        return "vggfeat"
    if "classifier.0.weight" in keys:
        return "torchvision"
    if "pre_logits.fc1.weight" in keys:
        return "timm"
    if "conv1_1.weight" in keys or "fc6.weight" in keys:
        return "caffe"
    sample = ", ".join(sorted(keys)[:6])
    raise InputError("not a VGG state dict of a known layout (vggfeat, torchvision, timm, "
                     f"caffe); its first keys are: {sample}")


def to_vggfeat(state_dict: dict[str, Tensor], model: VGG) -> tuple[dict[str, Tensor], str]:
    """Translate ``state_dict`` to the key names and shapes of ``model``.

    Returns the translated dict and the layout it came in.  Shapes are checked against ``model``
    so that a checkpoint of another config fails here with the offending key named.
    """
    fmt = detect_format(state_dict)
    feature_names = list(model.features._modules)
    fc_maps = {"torchvision": TORCHVISION_FC, "timm": TIMM_FC,
               "caffe": {n: n for n in FC_NAMES}}.get(fmt, {})
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if fmt == "vggfeat":
            new_key = key
        else:
            module, _, param = key.rpartition(".")
            indexed = re.fullmatch(r"features\.(\d+)", module)
            if indexed and fmt in ("torchvision", "timm"):
                index = int(indexed.group(1))
                if index >= len(feature_names):
                    raise InputError(f"checkpoint key {key!r} has no counterpart in VGG "
                                     f"{model.spec.name}: is it a checkpoint of another config?")
                new_key = f"features.{feature_names[index]}.{param}"
            elif module in fc_maps:
                new_key = f"head.{fc_maps[module]}.{param}"
            elif fmt == "caffe" and module in feature_names:
                new_key = f"features.{module}.{param}"
            else:
                raise InputError(f"checkpoint key {key!r} ({fmt} layout) has no counterpart in "
                                 f"VGG {model.spec.name}")
        out[new_key] = value
    return _fit_shapes(out, model, fmt), fmt


def _fit_shapes(state_dict: dict[str, Tensor], model: VGG, fmt: str) -> dict[str, Tensor]:
    """Reshape Linear fc weights to their conv form; fail on a true shape mismatch."""
    target = model.state_dict()
    # Checkpoints saved before PyTorch 0.4.1 (torchvision's *_bn files) lack this counter.
    for key in set(target) - set(state_dict):
        if key.endswith("num_batches_tracked"):
            state_dict[key] = target[key]
    missing = sorted(set(target) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(target))
    if missing or unexpected:
        raise InputError(f"{fmt} checkpoint does not fit VGG {model.spec.name} "
                         f"(width {model.config['width_mult']}, fc {model.config['fc_dim']}): "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    fitted = {}
    for key, value in state_dict.items():
        shape = target[key].shape
        if value.shape != shape:
            if value.numel() != target[key].numel() or not key.startswith("head."):
                raise InputError(f"{fmt} checkpoint key {key!r} has shape {tuple(value.shape)}; "
                                 f"VGG {model.spec.name} needs {tuple(shape)}")
            # A Linear weight (out, C·k·k) is the conv weight (out, C, k, k) flattened in C,H,W order.
            value = value.reshape(shape)
        fitted[key] = value
    return fitted


def fc_shapes(state_dict: dict[str, Tensor]) -> tuple[int, int]:
    """(fc_dim, num_classes) of a VGG state dict in any known layout (num_classes 0: no fc8)."""
    fmt = detect_format(state_dict)
    names = {"vggfeat": {f"head.{n}": n for n in FC_NAMES}, "torchvision": TORCHVISION_FC,
             "timm": TIMM_FC, "caffe": {n: n for n in FC_NAMES}}[fmt]
    out = {fc: state_dict[f"{module}.weight"].shape[0] for module, fc in names.items()
           if f"{module}.weight" in state_dict}
    if "fc6" not in out:
        raise InputError(f"the {fmt} state dict has no fc6 weight: not a whole VGG")
    return out["fc6"], out.get("fc8", 0)


def infer_config(state_dict: dict[str, Tensor], *, prefer: str | None = None) -> dict:
    """The :class:`VGG` arguments (arch, batch_norm, width_mult, fc_dim, num_classes) of the
    Table 1 config whose every key and shape the state dict fits; ``ValueError`` if none does.

    ``prefer`` (an arch name) is tried first: a vggfeat-layout A-LRN has exactly A's keys.
    """
    fc_dim, num_classes = fc_shapes(state_dict)
    first = next((v for v in state_dict.values() if v.ndim == 4), None)  # conv1_1 in any layout
    if first is None:
        raise InputError("it holds no conv weights")
    candidates = [(c, bn) for c in CFGS for bn in (False, True)]
    if prefer is not None:
        spec = parse_arch(prefer)
        candidates.insert(0, (spec.config, spec.batch_norm))
    for config, batch_norm in candidates:
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised
            model = VGG(config, batch_norm=batch_norm, width_mult=first.shape[0] / 64,
                        fc_dim=fc_dim, num_classes=num_classes)
        try:
            to_vggfeat(state_dict, model)
        except ValueError:
            continue
        return dict(model.config)
    raise InputError(f"the {detect_format(state_dict)} state dict fits none of the configs "
                     f"{', '.join(CFGS)} (with or without batch norm)")


def describe_config(config: dict) -> str:
    """``VGG E (vgg19)``, with width, fc and class counts where they are not the paper's."""
    spec = parse_arch(config["arch"], batch_norm=config["batch_norm"])
    extras = [f"{k}={config[k]:g}" for k, paper in (("width_mult", 1.0), ("fc_dim", FC_DIM),
                                                       ("num_classes", NUM_CLASSES))
              if config[k] != paper]
    return f"VGG {spec.name} ({', '.join([spec.common_name, *extras])})"


def to_torchvision(state_dict: dict[str, Tensor], model: VGG) -> dict[str, Tensor]:
    """The inverse translation, for handing vggfeat weights to ``torchvision.models.vgg*``."""
    feature_index = {name: i for i, name in enumerate(model.features._modules)}
    fc_index = {v: k for k, v in TORCHVISION_FC.items()}
    out = {}
    for key, value in state_dict.items():
        _, module, param = key.split(".")
        if key.startswith("features."):
            out[f"features.{feature_index[module]}.{param}"] = value
        else:
            out[f"{fc_index[module]}.{param}"] = value.flatten(1) if param == "weight" else value
    return out
