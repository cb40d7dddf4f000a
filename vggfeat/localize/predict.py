"""Boxes from localisation nets: the centre-crop protocol of Table 8 and the dense one of Tables 9–10.

* ``center-crop``: the image rescaled so its smallest side is Q, its central 224 crop through the
  net in crop mode; the box of a given (ground-truth) class.
* ``dense``: at each scale Q, the localisation nets run fully convolutionally on the image and its
  flip, and every map position gives a box per class (one for SCR), mapped back to the original
  image.  The classification net runs densely on the same views: its spatially averaged,
  flip-averaged softmax (as ``vggfeat evaluate --method dense``), averaged over scales, picks the
  top-5 classes, and its per-position softmax scores each position's box.  For each of those
  classes the boxes of all scales, flips and localisation nets are merged greedily
  (:mod:`.merge`); the merged box with the highest accumulated class score is the guess for that
  class.  The 5 guesses are ranked by that score.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data.folders import net_class_names
from ..data.images import read_image, rescale_views
from ..devices import default_device
from ..errors import ConfigError
from ..evaluate.methods import flip_averaged_posteriors
from ..models.configs import INPUT_SIZE
from ..models.factory import vgg
from ..models.runner import DeviceRunner
from ..models.vgg import VGG
from .geometry import decode, dense_boxes, to_original, view_geometry
from .merge import DEFAULT_THRESHOLD, best_boxes
from .net import BoxHead, class_boxes, head_of, load_localizer

METHODS = ("center-crop", "dense")
TOP_K = 5


@dataclass(frozen=True)
class Guess:
    """One (class, box, score) guess; the box is (xmin, ymin, xmax, ymax) in original pixels."""

    class_index: int  # in the classification net's class order
    wnid: str
    box: tuple[float, float, float, float]
    score: float  # accumulated class score of the merged box, per predicted box (0–1)


def default_scales(method: str, model: VGG) -> tuple[int, ...]:
    """Q = the training scale S the localisation net records (Table 9's single-scale rows), else
    256 for ``center-crop`` and 384 for ``dense``."""
    s = model.weights_meta.get("train_scale")
    if isinstance(s, (int, str)) and str(s).isdigit():
        return (int(s),)
    return (256,) if method == "center-crop" else (384,)


def class_names_of(model: VGG) -> list[str]:
    """Class names a net's weights record; the ImageNet WordNet ids for any 1000-class net."""
    names = net_class_names(model)
    if names is not None:
        return names
    raise ConfigError(f"the classification net has {model.num_classes} classes but its weights "
                      "record no class names; use a net trained by vggfeat, or a 1000-class "
                      "ImageNet net")


class Localizer:
    """Localisation nets (one or more, same protocol) and, for ``dense``, a classification net.

    Call :meth:`dense` or :meth:`center_crop` on views made by :func:`rescale_views`, or
    :meth:`__call__` on an image file or uint8 tensor for its top-5 guesses.
    """

    def __init__(self, loc_nets: VGG | list[VGG], cls_net: VGG | None = None, *,
                 method: str = "dense", scales: tuple[int, ...] | None = None, top_k: int = TOP_K,
                 merge_threshold: float = DEFAULT_THRESHOLD,
                 device: str | torch.device | None = None, batch_size: int = 8,
                 amp: str | None = None, channels_last: bool = True) -> None:
        loc_nets = [loc_nets] if isinstance(loc_nets, VGG) else list(loc_nets)
        if method not in METHODS:
            raise ConfigError(f"unknown localisation protocol {method!r}; choose "
                              f"{' or '.join(METHODS)}")
        if not loc_nets:
            raise ConfigError("give at least one localisation net")
        if method == "center-crop" and len(loc_nets) > 1:
            raise ConfigError("the center-crop protocol scores one localisation net at a time")
        if method == "dense" and cls_net is None:
            raise ConfigError("dense localisation needs a classification net for the class "
                              "scores (--cls-weights)")
        self.heads: list[BoxHead] = [head_of(m) for m in loc_nets]
        run = dict(device=device or default_device(), batch_size=batch_size, amp=amp,
                   channels_last=channels_last)
        self.locs = [DeviceRunner(m, **run) for m in loc_nets]
        self.cls = DeviceRunner(cls_net, **run) if cls_net is not None else None
        self.method = method
        self.scales = tuple(scales or default_scales(method, loc_nets[0]))
        if min(self.scales) < INPUT_SIZE:
            raise ConfigError(f"localisation needs scales Q ≥ {INPUT_SIZE} (the net's window), "
                              f"got {self.scales}")
        if method == "center-crop" and len(self.scales) > 1:
            raise ConfigError(f"the center-crop protocol uses one scale, got {self.scales}")
        self.top_k, self.merge_threshold = top_k, merge_threshold
        self.class_names = class_names_of(cls_net) if cls_net is not None else \
            list(self.heads[0].class_names)
        # Column of each classification class in each PCR head (-1: the head lacks the class).
        self._columns = []
        for head in self.heads:
            index = {name: k for k, name in enumerate(head.class_names)}
            columns = np.array([0 if head.kind == "scr" else index.get(name, -1)
                                for name in self.class_names])
            if (columns < 0).all():
                raise ConfigError(f"the PCR localisation net boxes {len(head.class_names)} classes "
                                  f"({', '.join(head.class_names[:3])} …), none of which the "
                                  "classification net predicts; use a classifier of the same "
                                  "classes")
            self._columns.append(columns)

    @classmethod
    def from_weights(cls, weights: str | os.PathLike | list, cls_weights: str | None = None,
                     **kwargs) -> Localizer:
        """From weights files: localisation net(s) and, for ``dense``, a classification net."""
        paths = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
        loc_nets = [load_localizer(p)[0] for p in paths]
        cls_net = vgg(weights=cls_weights) if cls_weights is not None else None
        return cls(loc_nets, cls_net, **kwargs)

    def prepare(self, image: Tensor) -> list[Tensor]:
        """uint8 3×H×W → one view per scale, then the original size as a tensor (H, W): what
        the data loader workers do (a list of tensors, as the loader pins them)."""
        crop = INPUT_SIZE if self.method == "center-crop" else None
        return [*rescale_views(image, self.scales, crop=crop), torch.tensor(image.shape[-2:])]

    @staticmethod
    def unpack(prepared: list[Tensor]) -> tuple[list[Tensor], tuple[int, int]]:
        """(views, (H, W)) of a :meth:`prepare` result."""
        return prepared[:-1], tuple(prepared[-1].tolist())

    def __call__(self, image: str | os.PathLike | Tensor, *, class_index: int | None = None
                 ) -> list[Guess]:
        """Top-k guesses for an image file or uint8 3×H×W tensor (``dense``), or, for
        ``center-crop``, the one guess for ``class_index``."""
        if not isinstance(image, Tensor):
            image = read_image(image)
        views, size = self.unpack(self.prepare(image))
        if self.method == "dense":
            return self.dense(views, size)
        if class_index is None:
            raise ConfigError("the center-crop protocol boxes a given class: pass class_index")
        box = self.center_crop([views], [size], torch.tensor([class_index]))[0]
        return [Guess(class_index, self.class_names[class_index], tuple(box.tolist()), 1.0)]

    @torch.inference_mode()
    def center_crop(self, views: list[list[Tensor]], sizes: list[tuple[int, int]],
                    classes: Tensor) -> Tensor:
        """Boxes N×4 (original pixels) for the central 224 crops of N images and their classes
        (indices into :attr:`class_names`)."""
        runner, head, columns = self.locs[0], self.heads[0], self._columns[0]
        crops = torch.stack([v[0] for v in views])
        outputs = []
        for start in range(0, len(crops), runner.batch_size):
            with runner.autocast():
                outputs.append(runner.model(runner.network_input(crops[start:start +
                                                                         runner.batch_size]))
                               .float().cpu())
        cols = torch.as_tensor(columns[classes.numpy()])
        if (cols < 0).any():
            raise ConfigError("a ground-truth class is not among the localisation net's classes")
        boxes = decode(class_boxes(torch.cat(outputs), cols, head))
        out = torch.empty(len(views), 4)
        for n, (h, w) in enumerate(sizes):
            g = view_geometry(h, w, self.scales[0])
            top, left = round((g.height - INPUT_SIZE) / 2), round((g.width - INPUT_SIZE) / 2)
            out[n] = to_original(boxes[n] + torch.tensor([left, top, left, top]), g, w, h)
        return out

    @torch.inference_mode()
    def dense(self, views: list[Tensor], size: tuple[int, int]) -> list[Guess]:
        """Top-k guesses of one image from its per-scale views (uint8 3×Hq×Wq)."""
        h, w = size
        posterior = torch.zeros(len(self.class_names))
        per_position = []  # per (scale, net): boxes 2×B×h×w×4 and class scores 2×C×h×w
        for q, view in zip(self.scales, views):
            g = view_geometry(h, w, q)
            with self.cls.autocast():
                x = self.cls.network_input(view[None])
                maps = self.cls.model.score_map(torch.cat([x, x.flip(-1)])).float()
            posterior += flip_averaged_posteriors(maps, 1)[0].cpu()
            probs = maps.softmax(1).cpu()  # 2×C×h×w, flipped view second (not mirrored back)
            for runner, head in zip(self.locs, self.heads):
                with runner.autocast():
                    x = runner.network_input(view[None])
                    out = runner.model.score_map(torch.cat([x, x.flip(-1)])).float().cpu()
                maps4 = out.unflatten(1, (-1, 4))  # 2×B×4×h×w
                found = to_original(dense_boxes(maps4, view.shape[-1]), g, w, h)
                per_position.append((found, probs))
        posterior /= len(self.scales)
        top = posterior.topk(min(self.top_k, len(posterior))).indices.tolist()
        boxes, scores = [], []  # per top class: every box for it, and its class scores
        for c in top:
            group_boxes, group_scores = [], []
            for (found, probs), columns in zip(per_position, self._columns * len(self.scales)):
                col = columns[c]
                if col < 0:
                    continue
                group_boxes.append(found[:, col].reshape(-1, 4))  # (2·h·w)×4
                group_scores.append(probs[:, c].reshape(-1))
            boxes.append(torch.cat(group_boxes) if group_boxes else torch.zeros(0, 4))
            scores.append(torch.cat(group_scores) if group_scores else torch.zeros(0))
        n = max(1, max(len(s) for s in scores))  # a class no PCR net boxes has no boxes
        padded = np.zeros((len(top), n, 4))
        padded_scores = np.zeros((len(top), n))
        valid = np.zeros((len(top), n), bool)
        for g, (b, s) in enumerate(zip(boxes, scores)):
            padded[g, :len(s)], padded_scores[g, :len(s)], valid[g, :len(s)] = b, s, True
        best, rating = best_boxes(padded, padded_scores, threshold=self.merge_threshold,
                                  valid=valid)
        guesses = [Guess(c, self.class_names[c], tuple(float(v) for v in best[g]),
                         float(rating[g] / max(valid[g].sum(), 1)))
                   for g, c in enumerate(top) if valid[g].any()]
        return sorted(guesses, key=lambda guess: -guess.score)


def localize(image: str | os.PathLike | Tensor, *, weights: str | os.PathLike | list,
             cls_weights: str = "torchvision", scales: tuple[int, ...] | None = None,
             top_k: int = TOP_K, device: str | None = None) -> list[Guess]:
    """The top-5 (class, box, score) guesses for one image, in one call.

    Args:
        image: an image file or a uint8 RGB tensor 3×H×W.
        weights: localisation net weights file(s) (made by ``vggfeat localize train``).
        cls_weights: the classification net (``torchvision``, ``timm`` or a weights file).
        scales: test scales Q (default: the localisation net's training S, else 384).
        device: where the nets run (default: cuda when available).

    Returns:
        Up to ``top_k`` :class:`Guess` es, best first; boxes in pixels of the original image.
    """
    localizer = Localizer.from_weights(weights, cls_weights, method="dense", scales=scales,
                                       top_k=top_k, device=device)
    return localizer(image)
