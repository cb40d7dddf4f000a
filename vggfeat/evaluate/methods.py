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

from ..choices import METHODS
from ..errors import ConfigError, InputError
from ..models.configs import INPUT_SIZE
from ..models.runner import DeviceRunner, cudnn_benchmark
from ..models.vgg import VGG

GRID = 5
CENTER_CROP_RESIZE = 256


def crop_grid(height: int, width: int, *, size: int = INPUT_SIZE, n: int = GRID) -> list[tuple[int, int]]:
    """(top, left) corners of an n×n regular grid of size×size crops covering an H×W image."""
    if min(height, width) < size:
        raise InputError(f"multi-crop needs images of at least {size} px, got {height}×{width}")
    tops = np.linspace(0, height - size, n).round().astype(int)
    lefts = np.linspace(0, width - size, n).round().astype(int)
    return [(int(t), int(left)) for t in tops for left in lefts]


class Evaluator(DeviceRunner):
    """Posteriors N×K for batches of per-scale uint8 views (as :func:`rescale_views` makes them).

    Same-shape images run through the net together (see :class:`DeviceRunner`); crops are cut
    on the device from the normalised image, and the posteriors of a batch come back to the
    host in one copy.
    """

    def __init__(self, model: VGG, method: str, *, device: str | torch.device = "cpu",
                 batch_size: int = 8, amp: str | None = None,
                 channels_last: bool = True, window: int | None = None,
                 backend: str = "auto") -> None:
        if method not in METHODS:
            raise ConfigError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")
        super().__init__(model, device=device, batch_size=batch_size, amp=amp,
                         channels_last=channels_last, window=window, backend=backend,
                         reads=())
        self.method = method
        self.crops_run = 0  # crops evaluated so far, for reporting and tests

    def forward_views(self, scale: int, batch: Tensor) -> Tensor:
        """Posteriors N×K on the device of N same-shape images at one scale (for
        ``dense+multi-crop``: the sum of both methods' posteriors)."""
        out = 0
        if self.method in ("dense", "dense+multi-crop"):
            out = out + self.dense(batch)
        if self.method in ("multi-crop", "dense+multi-crop"):
            out = out + torch.stack([self.multi_crop(view) for view in batch])
        if self.method == "center-crop":
            out = self.crops(self.network_input(batch))
        return out

    def rows(self, results: list[list[Tensor]]) -> Tensor:
        """Per-image lists of per-scale posteriors → N×K posteriors averaged over scales (and
        methods), on the host."""
        total = torch.stack([torch.stack(r) for r in results]).cpu()  # one copy to the host
        per_scale = 2 if self.method == "dense+multi-crop" else 1
        return total.sum(1) / (total.shape[1] * per_scale)

    def dense(self, batch: Tensor) -> Tensor:
        """Flip-averaged softmax of the spatially averaged score map of uint8 N×3×H×W
        same-shape images: N×K posteriors on the device."""
        # Every image size is a new shape: cudnn's per-shape search would cost more than it saves.
        with cudnn_benchmark(False):
            maps = self.flip_pass(batch)
        return flip_averaged_posteriors(maps)

    def multi_crop(self, view: Tensor) -> Tensor:
        """Mean softmax over the 5×5 grid of 224 crops and their flips (50 crops): K, on the
        device.  The image goes to the device once; the crops are views of it there."""
        x = self.network_input(view[None])
        crops = torch.cat([x[..., t:t + INPUT_SIZE, left:left + INPUT_SIZE]
                           for t, left in crop_grid(*view.shape[-2:])])
        return self.crops(torch.cat([crops, crops.flip(-1)])).mean(0)

    def crops(self, x: Tensor) -> Tensor:
        """Softmax posteriors of normalised 224 crops (M×3×224×224, on the device): M×K."""
        out = []
        for start in range(0, len(x), self.batch_size * 2):
            with self.autocast():
                logits = self.model(x[start:start + self.batch_size * 2])
            out.append(logits.float().softmax(1))
        self.crops_run += len(x)
        return torch.cat(out)


def flip_averaged_posteriors(maps: Tensor) -> Tensor:
    """Score maps of n images and of their flips (2×n×K×h×w, as :meth:`DeviceRunner.flip_pass`
    gives them) → n×K dense posteriors: the spatially averaged scores' softmax, averaged over
    the image and its flip."""
    return maps.float().mean((3, 4)).softmax(2).mean(0)


def topk_misses(posteriors: np.ndarray | Tensor, labels: np.ndarray | Tensor, k: int) -> int:
    """How many images do not have their label among the k best classes."""
    posteriors, labels = torch.as_tensor(posteriors), torch.as_tensor(labels)
    topk = posteriors.topk(min(k, posteriors.shape[1]), dim=1).indices
    return int((topk != labels[:, None]).all(dim=1).sum())


def topk_error(posteriors: np.ndarray | Tensor, labels: np.ndarray | Tensor, k: int) -> float:
    """Top-k error in percent: the share of images whose label is not among the k best classes."""
    if len(labels) == 0:
        raise InputError("no images to score")
    return 100.0 * topk_misses(posteriors, labels, k) / len(labels)
