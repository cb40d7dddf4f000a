"""Boxes as the localisation net sees them, and boxes carried through image transforms.

The net's 4 outputs per box are ``(cx, cy, w, h) / 224``: the box centre, width and height in
pixels of the 224×224 window the net looked at, divided by 224.  A box filling the window is
(0.5, 0.5, 1, 1); the centre of a box may leave [0, 1] when the box sticks out of the window.
In dense mode the window of map position (i, j) is the 224 square at (32·j, 32·i) of the rescaled
image, so every position predicts a box in its own window's frame.

Training augmentation is the classification one (rescale to S, random 224 crop, flip, colour
shift) applied to the image and its boxes together.  When a crop cuts the object, the target is
the part of the object left in the crop (the box clipped to the window), because that is what
the net can see.  A crop that keeps less than ``min_visible`` (half) of every object's area is
redrawn, up to ``tries`` times; if all fail, the crop is centred on the largest object instead,
so a training target never describes an object the crop does not show.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.ops import box_convert, box_iou
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ..data.images import MAX_ASPECT, aspect_window
from ..models.configs import INPUT_SIZE, STRIDE

WINDOW = INPUT_SIZE


def encode(xyxy: Tensor, window: int = WINDOW) -> Tensor:
    """Corner boxes (…×4, pixels of a window) → net targets (cx, cy, w, h) / window."""
    return box_convert(xyxy, "xyxy", "cxcywh") / window


def decode(params: Tensor, window: int = WINDOW) -> Tensor:
    """Net outputs (…×4, (cx, cy, w, h) / window) → corner boxes in pixels of the window."""
    # A negative width or height means "nothing": an empty box at the centre.
    params = torch.cat([params[..., :2], params[..., 2:].clamp(min=0)], -1)
    return box_convert(params * window, "cxcywh", "xyxy")


def iou(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> Tensor:
    """Intersection over union of corner boxes: N×4, M×4 → N×M (torchvision's ``box_iou``)."""
    return box_iou(torch.as_tensor(a, dtype=torch.float32).reshape(-1, 4),
                   torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4))


def area(xyxy: Tensor) -> Tensor:
    return (xyxy[..., 2] - xyxy[..., 0]).clamp(min=0) * (xyxy[..., 3] - xyxy[..., 1]).clamp(min=0)


class BoxAugment:
    """A training transform (rescale, random crop, flip) applied to an image and its boxes.

    ``transform`` is the classification one (:func:`vggfeat.train.train_transform`): its first
    step rescales, its second crops, the rest (the flip) follow.  Called with
    ``(uint8 3×H×W image, M×4 corner boxes)``, it returns the uint8 view and the net's target,
    4 floats: the visible part of the object that stays most in view, encoded by :func:`encode`.
    Random draws use torch's global generator (seed it, as :func:`vggfeat.train.augment.augment`
    does).
    """

    def __init__(self, transform: v2.Compose, *, min_visible: float = 0.5, tries: int = 10) -> None:
        steps = list(transform.transforms)
        if len(steps) < 2 or not isinstance(steps[1], v2.RandomCrop):
            raise ValueError("expected a rescale, random-crop[, flip] training transform")
        self.rescale, self.crop = steps[0], steps[1]
        self.rest = v2.Compose(steps[2:]) if steps[2:] else v2.Identity()
        self.size = steps[1].size
        self.min_visible, self.tries = min_visible, tries

    def __call__(self, sample: tuple[Tensor, np.ndarray | Tensor]) -> tuple[Tensor, Tensor]:
        image, xyxy = sample
        boxes = tv_tensors.BoundingBoxes(torch.as_tensor(xyxy, dtype=torch.float32).reshape(-1, 4),
                                         format="XYXY", canvas_size=tuple(image.shape[-2:]))
        image, boxes = self.rescale(image, boxes)
        whole = area(boxes).clamp(min=1e-6)
        for _ in range(self.tries):
            view, kept = self.crop(image, boxes)
            visible = area(kept) / whole
            if visible.max() >= self.min_visible:
                break
        else:  # centre the crop on the largest object
            k = int(whole.argmax())
            (cx, cy), (h, w) = ((boxes[k, :2] + boxes[k, 2:]) / 2).tolist(), image.shape[-2:]
            ch, cw = self.size
            top = int(min(max(cy - ch / 2, 0), h - ch))
            left = int(min(max(cx - cw / 2, 0), w - cw))
            view, kept = TF.crop(image, top, left, ch, cw), TF.crop(boxes, top, left, ch, cw)
            visible = area(kept) / whole
        view, kept = self.rest(view, kept)
        return view, encode(kept[int(visible.argmax())].as_subclass(Tensor), self.size[0])


class ViewGeometry(NamedTuple):
    """How a view maps to its original image: view pixel x is original pixel ``left + x / sx``."""

    left: float
    top: float
    sx: float
    sy: float
    width: int  # of the view
    height: int


def view_geometry(height: int, width: int, scale: int, max_aspect: float = MAX_ASPECT
                  ) -> ViewGeometry:
    """The geometry of the view :func:`vggfeat.data.images.rescale_views` makes of an H×W image
    at scale Q (aspect-capped, rescaled so the smallest side is Q, before any crop)."""
    top, left, h, w = aspect_window(height, width, max_aspect)
    vh, vw = (scale, int(scale * w / h)) if h <= w else (int(scale * h / w), scale)
    return ViewGeometry(float(left), float(top), vw / w, vh / h, vw, vh)


def to_original(boxes: Tensor, geometry: ViewGeometry, width: int, height: int) -> Tensor:
    """View-pixel corner boxes (…×4) → original-image pixels, clipped to the W×H image."""
    g = geometry
    scale = torch.tensor([g.sx, g.sy, g.sx, g.sy])
    shift = torch.tensor([g.left, g.top, g.left, g.top])
    limit = torch.tensor([width, height, width, height], dtype=torch.float32)
    return torch.minimum((boxes / scale + shift).clamp(min=0), limit)


def dense_boxes(maps: Tensor, view_width: int) -> Tensor:
    """Boxes of a dense box map, in pixels of the view the map was computed on.

    ``maps``: F×B×4×h×w (F = 1, or 2 with the flipped view second; B boxes per position, e.g.
    one per class), position (i, j) predicting in the 224 window at (32·j, 32·i).  Boxes of the
    flipped view are mirrored back.  Returns F×B×h×w×4 corner boxes.
    """
    f, b, _, h, w = maps.shape
    boxes = decode(maps.permute(0, 1, 3, 4, 2).float())  # F×B×h×w×4 in window pixels
    ys = torch.arange(h, dtype=torch.float32, device=maps.device) * STRIDE
    xs = torch.arange(w, dtype=torch.float32, device=maps.device) * STRIDE
    offset = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None],
                                                 xs[None, :], ys[:, None]), -1)
    boxes = boxes + offset
    if f == 2:  # x → W − x, and the corners swap
        flipped = boxes[1]
        boxes = torch.stack([boxes[0], torch.stack(
            [view_width - flipped[..., 2], flipped[..., 1], view_width - flipped[..., 0],
             flipped[..., 3]], -1)])
    return boxes
