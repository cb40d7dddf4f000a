"""The paper's Appendix B descriptor: dense multi-scale pooling of a named layer.

For each scale Q the image is rescaled so its smallest side is Q, the net is applied densely,
the chosen layer's map is globally pooled, and the result is averaged with that of the
horizontally flipped image.  Scales are then averaged (``mean``) or concatenated (``stack``) and
the descriptor is L2-normalised.  In crop mode (``crop=224``) each Q is instead the resize size
before a centre crop, torchvision-style.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..choices import AGGREGATES, CROP_SCALES, DENSE_SCALES, POOLS
from ..data.images import MAX_ASPECT, rescale_views
from ..errors import ConfigError
from ..models.configs import INPUT_SIZE
from ..models.runner import DeviceRunner
from ..models.vgg import VGG


@dataclass(frozen=True)
class DescriptorSpec:
    """How descriptors are computed; stored with every cache so runs can be compared.

    Attributes:
        layer: a layer name of :meth:`VGG.forward_layers` (``fc7``, ``conv5_3:pre``, …).
        scales: smallest-side sizes Q in px (crop mode: resize sizes before the crop); default
            the paper's (256, 384, 512), or (256,) in crop mode (torchvision's resize 256).
        pool: global pooling of the layer's map, ``avg`` or ``max``.
        aggregate: ``mean`` or ``stack`` of the per-scale descriptors.
        flip: average with the horizontally flipped image; default on for dense descriptors
            (the paper's), off in crop mode (torchvision's single centre crop).
        l2: L2-normalise the final descriptor.
        crop: centre-crop side in px (torchvision-style single crop), or None for dense.
        max_aspect: long/short side ratio above which the long side is centre-cropped.
    """

    layer: str = "fc7"
    scales: tuple[int, ...] | None = None
    pool: str = "avg"
    aggregate: str = "mean"
    flip: bool | None = None
    l2: bool = True
    crop: int | None = None
    max_aspect: float = MAX_ASPECT

    def __post_init__(self) -> None:
        if self.scales is None:
            object.__setattr__(self, "scales", DENSE_SCALES if self.crop is None else CROP_SCALES)
        if self.flip is None:
            object.__setattr__(self, "flip", self.crop is None)
        object.__setattr__(self, "scales", tuple(int(q) for q in self.scales))
        if not self.scales or len(set(self.scales)) != len(self.scales):
            raise ConfigError(f"scales must be distinct sizes in px, got {self.scales}")
        if self.pool not in POOLS:
            raise ConfigError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        smallest = self.crop if self.crop is not None else min(self.scales)
        if self.crop is not None and min(self.scales) < self.crop:
            raise ConfigError(f"crop mode resizes to each scale then crops {self.crop} px: every "
                              f"scale must be ≥ {self.crop}, got {self.scales}")
        if smallest < 32:
            raise ConfigError(f"scales must be at least 32 px, got {self.scales}")
        if self.layer.split(":")[0].startswith(("fc", "prob")) and smallest < INPUT_SIZE:
            raise ConfigError(f"layer {self.layer} needs inputs of at least {INPUT_SIZE} px; "
                              f"got scales {self.scales} (use --scales ≥ {INPUT_SIZE})")

    def to_attrs(self) -> dict:
        d = asdict(self)
        d["scales"] = list(self.scales)
        d["crop"] = 0 if self.crop is None else self.crop
        return d

    def dim(self, channels: int) -> int:
        return channels * (len(self.scales) if self.aggregate == "stack" else 1)


def prepare(image: Tensor, spec: DescriptorSpec) -> list[Tensor]:
    """Loader-side work for one decoded RGB uint8 image 3×H×W: one uint8 tensor per scale."""
    return rescale_views(image, spec.scales, max_aspect=spec.max_aspect, crop=spec.crop)


class DescriptorNet(DeviceRunner):
    """Computes descriptors for batches of prepared images on one device.

    Images with identical shapes at a scale run through the net together (``batch_size`` at a
    time, gathered across ``window`` consecutive images when streamed, flips included in the
    same pass); the result does not depend on batching.
    """

    def __init__(self, model: VGG, spec: DescriptorSpec, *, device: str | torch.device = "cpu",
                 batch_size: int = 8, amp: str | None = None, window: int | None = None,
                 backend: str = "auto") -> None:
        model.check_layer(spec.layer)
        super().__init__(model, device=device, batch_size=batch_size, amp=amp, window=window,
                         backend=backend, reads=[spec.layer])
        self.spec = spec
        self.channels = model.layer_channels(spec.layer)

    @property
    def dim(self) -> int:
        return self.spec.dim(self.channels)

    def forward_views(self, scale: int, batch: Tensor) -> Tensor:
        return self.pooled(batch)

    def rows(self, results: list[list[Tensor]]) -> Tensor:
        """Per-image lists of pooled C-vectors, one per scale → float32 N×dim descriptors (CPU)."""
        # one copy to the host
        per_scale = torch.stack([torch.stack(r) for r in results]).float().cpu()
        if self.spec.aggregate == "mean":
            out = per_scale.mean(dim=1)
        else:
            out = per_scale.flatten(1)
        return F.normalize(out, dim=1) if self.spec.l2 else out

    def pooled(self, batch: Tensor) -> Tensor:
        """uint8 N×3×H×W → N×C globally pooled layer output, flip-averaged if asked."""
        return self.flip_pass(batch, self._pooled_layer, flip=self.spec.flip).mean(dim=0)

    def _pooled_layer(self, x: Tensor) -> Tensor:
        """Normalised input N×3×H×W → N×C: the layer's map, globally pooled in float32."""
        fmap = self.model.forward_layers(x, [self.spec.layer])[self.spec.layer].float()
        return fmap.mean(dim=(2, 3)) if self.spec.pool == "avg" else fmap.amax(dim=(2, 3))
