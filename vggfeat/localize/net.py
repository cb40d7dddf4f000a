"""Localisation nets (Appendix A): a Table 1 VGG whose fc8 predicts boxes instead of class scores.

* single-class regression (SCR): fc8 has 4 outputs, one box whatever the class;
* per-class regression (PCR): fc8 has 4·C outputs, outputs 4c … 4c+3 are class c's box.

Every other layer keeps its name and shape, so a localisation net is built by :func:`vggfeat.vgg`
like any other, initialised from a classification net except fc8, and runs densely through
:meth:`VGG.score_map` (whose N×4C×h×w output is then a map of boxes).  The head travels in the
weights' metadata (``weights_meta["localization"]`` plus ``class_names``), so a saved net loads
back with :func:`load_localizer` and nothing else.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError, WeightsError
from ..models.factory import NewHeadWarning, vgg
from ..models.vgg import VGG

HEADS = ("scr", "pcr")
BOX_ENCODING = "cx,cy,w,h / 224 (window of the net)"


@dataclass(frozen=True)
class BoxHead:
    """What fc8 of a localisation net predicts."""

    kind: str  # "scr" or "pcr"
    class_names: tuple[str, ...]  # the classes of the classification data it was trained on

    @property
    def outputs(self) -> int:
        return 4 if self.kind == "scr" else 4 * len(self.class_names)

    def describe(self) -> str:
        """fc8's outputs in words, e.g. ``4×2 = 8 outputs (PCR, one box per class, 2 classes)``."""
        if self.kind == "scr":
            return "4 outputs (SCR, one box for every class)"
        return (f"4×{len(self.class_names)} = {self.outputs} outputs (PCR, one box per class, "
                f"{len(self.class_names)} classes)")

    def to_meta(self) -> dict:
        return {"localization": {"head": self.kind, "box": BOX_ENCODING},
                "class_names": list(self.class_names)}


def box_head(kind: str, class_names: list[str] | tuple[str, ...]) -> BoxHead:
    if kind not in HEADS:
        raise ConfigError(f"unknown box head {kind!r}; choose scr (one box, 4 outputs) or pcr "
                          "(one box per class, 4 outputs per class)")
    if not class_names:
        raise ConfigError("a localisation net needs the class names of its data")
    return BoxHead(kind, tuple(class_names))


def localization_net(head: BoxHead, *, weights: str | os.PathLike | None = None,
                     arch: str | None = None, seed: int | None = None, **kwargs) -> VGG:
    """A VGG with ``head`` as fc8: every other layer from the classification net ``weights``
    (a vggfeat, torchvision or timm weights file, or ``"torchvision"``/``"timm"``), fc8 new.

    Without ``weights`` the whole net is initialised (``init``, ``seed``).  ``kwargs`` go to
    :func:`vggfeat.vgg` (``width_mult``, ``fc_dim``, ``dropout``, ``init``, ``preprocessing``).
    """
    return new_box_layer(lambda: vgg(arch, weights=weights, num_classes=head.outputs, seed=seed,
                                     **kwargs), head)


def new_box_layer(build: Callable[[], VGG], head: BoxHead) -> VGG:
    """``build()`` with ``head`` attached, and the builder's new-fc8 warning worded for a box
    layer: its outputs are box parameters, not classes (the classifier's wording says "for 4000
    classes" for PCR)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build()
    new = model.weights_meta.get("new_head")
    for w in caught:
        if issubclass(w.category, NewHeadWarning) and new:
            w.message = NewHeadWarning(
                f"VGG {model.spec.name}: conv1_1 … fc7 come from the weights "
                f"({model.weights_meta.get('source')}, {new['replaced_classes']} classes); fc8 "
                f"is a new box layer, initialised ({new['init']}, seed {new['seed']}): "
                f"{head.describe()}")
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return attach_head(model, head)


def attach_head(model: VGG, head: BoxHead) -> VGG:
    """Record ``head`` in ``model.weights_meta`` (checked against fc8), so exports carry it."""
    if model.num_classes != head.outputs:
        raise ConfigError(f"fc8 has {model.num_classes} outputs; a {head.kind.upper()} head over "
                          f"{len(head.class_names)} classes needs {head.outputs}")
    model.weights_meta = {**model.weights_meta, **head.to_meta()}
    return model


def head_of(model: VGG, *, where: str = "the net") -> BoxHead:
    """The box head a localisation net's weights record; a clear error for a classifier."""
    info = model.weights_meta.get("localization")
    names = model.weights_meta.get("class_names")
    if not isinstance(info, dict) or "head" not in info or not names:
        raise WeightsError(f"{where} is not a localisation net (its weights record no box head); "
                           "train one with `vggfeat localize train`, or pass it as --cls-weights")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or \
            len(set(names)) != len(names):
        raise WeightsError(f"{where}: its class_names must be a list of distinct class names "
                           f"(strings), got {str(names)[:80]}; re-export the net with "
                           "vggfeat.save_weights and the class names of its training data")
    head = box_head(info["head"], names)
    if head.outputs != model.num_classes:
        raise WeightsError(f"{where}: fc8 has {model.num_classes} outputs, but its "
                           f"{head.kind.upper()} head over {len(names)} classes needs "
                           f"{head.outputs}")
    return head


def load_localizer(weights: str | os.PathLike, **kwargs) -> tuple[VGG, BoxHead]:
    """A saved localisation net and its head, from its weights file alone."""
    model = vgg(weights=weights, **kwargs)
    return model, head_of(model, where=str(weights))


def class_boxes(outputs: Tensor, classes: Tensor | None, head: BoxHead) -> Tensor:
    """The 4 box parameters for each row's class: outputs N×K (K = 4 or 4C), classes N → N×4.

    SCR ignores the class; PCR picks outputs 4c … 4c+3.
    """
    if head.kind == "scr":
        return outputs
    per_class = outputs.unflatten(1, (-1, 4))
    return per_class[torch.arange(len(outputs), device=outputs.device), classes.long()]


def euclidean_loss(outputs: Tensor, targets: Tensor, head: BoxHead) -> Tensor:
    """Caffe's Euclidean loss on the box parameters, ½‖ŷ − y‖² averaged over the batch.

    ``targets`` is N×5: (class index, cx, cy, w, h); with PCR only the ground-truth class's 4
    outputs count.
    """
    predicted = class_boxes(outputs.float(), targets[:, 0], head)
    return 0.5 * (predicted - targets[:, 1:]).square().sum(1).mean()
