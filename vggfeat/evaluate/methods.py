"""Sect. 3.2 test-time methods: class posteriors from dense, multi-crop and centre-crop passes.

* ``dense``: the fully-convolutional net on the whole image rescaled to Q; the class score map
  is spatially averaged, and the softmax posteriors of the image and its flip are averaged.
* ``multi-crop``: a 5×5 regular grid of 224 crops of the rescaled image, and their flips: 50
  crops per scale, softmax posteriors averaged.
* ``dense+multi-crop``: the two posteriors averaged.
* ``center-crop``: torchvision's protocol, resize 256 and one centre 224 crop.

Several scales average their posteriors.  Dense and crops of one scale come from the same
decoded, rescaled image.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..models.configs import INPUT_SIZE
from ..models.runner import DeviceRunner
from ..models.vgg import VGG

METHODS = ("dense", "multi-crop", "dense+multi-crop", "center-crop")
GRID = 5
CENTER_CROP_RESIZE = 256


def crop_grid(height: int, width: int, *, size: int = INPUT_SIZE, n: int = GRID) -> list[tuple[int, int]]:
    """(top, left) corners of an n×n regular grid of size×size crops covering an H×W image."""
    if min(height, width) < size:
        raise ValueError(f"multi-crop needs images of at least {size} px, got {height}×{width}")
    tops = np.linspace(0, height - size, n).round().astype(int)
    lefts = np.linspace(0, width - size, n).round().astype(int)
    return [(int(t), int(left)) for t in tops for left in lefts]


class Evaluator(DeviceRunner):
    """Posteriors N×K for batches of per-scale uint8 views (as :func:`rescale_views` makes them)."""

    def __init__(self, model: VGG, method: str, *, device: str | torch.device = "cpu",
                 batch_size: int = 8, amp: str | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")
        super().__init__(model, device=device, batch_size=batch_size, amp=amp)
        self.method = method
        self.crops_run = 0  # crops evaluated so far, for reporting and tests

    @torch.inference_mode()
    def __call__(self, items: list[list[Tensor]]) -> Tensor:
        n_scales = len(items[0])
        total = torch.zeros(len(items), self.model.num_classes)
        for s in range(n_scales):
            views = [item[s] for item in items]
            if self.method in ("dense", "dense+multi-crop"):
                total += self.dense(views)
            if self.method in ("multi-crop", "dense+multi-crop"):
                total += torch.stack([self.multi_crop(v) for v in views])
            if self.method == "center-crop":
                total += self.crops(torch.stack(views))
        per_scale = 2 if self.method == "dense+multi-crop" else 1
        return total / (n_scales * per_scale)

    def dense(self, views: list[Tensor]) -> Tensor:
        """Flip-averaged softmax of the spatially averaged score map, per image: N×K."""
        out = torch.empty(len(views), self.model.num_classes)
        for chunk in self.same_shape_chunks(views):
            x = self.network_input(torch.stack([views[i] for i in chunk]))
            with self.autocast():
                scores = self.model.score_map(torch.cat([x, x.flip(-1)])).float().mean((2, 3))
            out[chunk] = scores.softmax(1).view(2, len(chunk), -1).mean(0).cpu()
        return out

    def multi_crop(self, view: Tensor) -> Tensor:
        """Mean softmax over the 5×5 grid of 224 crops and their flips (50 crops): K."""
        crops = torch.stack([view[:, t:t + INPUT_SIZE, left:left + INPUT_SIZE]
                             for t, left in crop_grid(*view.shape[-2:])])
        crops = torch.cat([crops, crops.flip(-1)])
        return self.crops(crops).mean(0)

    def crops(self, crops: Tensor) -> Tensor:
        """Softmax posteriors of 224 crops (uint8 M×3×224×224) in crop mode: M×K."""
        out = []
        for start in range(0, len(crops), self.batch_size * 2):
            with self.autocast():
                logits = self.model(self.network_input(crops[start:start + self.batch_size * 2]))
            out.append(logits.float().softmax(1).cpu())
        self.crops_run += len(crops)
        return torch.cat(out)


def topk_error(posteriors: np.ndarray | Tensor, labels: np.ndarray | Tensor, k: int) -> float:
    """Top-k error in percent: the share of images whose label is not among the k best classes."""
    posteriors, labels = torch.as_tensor(posteriors), torch.as_tensor(labels)
    if len(labels) == 0:
        raise ValueError("no images to score")
    topk = posteriors.topk(min(k, posteriors.shape[1]), dim=1).indices
    hit = (topk == labels[:, None]).any(dim=1)
    return 100.0 * (1.0 - hit.float().mean().item())
