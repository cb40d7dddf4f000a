"""Input normalisation that travels with each set of weights.

Images enter the network as uint8 RGB batches (N×3×H×W, 0–255) and are normalised on the device
the network runs on, so loaders move bytes, not floats.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from ..errors import ConfigError


@dataclass(frozen=True)
class Preprocessing:
    """``y = (x · scale − mean) / std`` per channel, after reordering to ``channel_order``.

    ``mean`` and ``std`` are given in the network's channel order and in scaled units.
    """

    name: str
    channel_order: str  # "RGB" or "BGR"
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __call__(self, images: Tensor) -> Tensor:
        """uint8 (or 0–255 float) RGB N×3×H×W → float32 network input of the same shape."""
        x = images.float()
        if self.channel_order == "BGR":
            x = x.flip(1)
        mean, std = _constants(self, x.device)
        return (x * self.scale - mean) / std

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        fields = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


@functools.lru_cache(maxsize=64)
def _constants(p: Preprocessing, device: torch.device) -> tuple[Tensor, Tensor]:
    # Built once per device: a tensor made from Python numbers on a GPU is a blocking copy.
    mean = torch.tensor(p.mean).view(1, 3, 1, 1).to(device)
    return mean, torch.tensor(p.std).view(1, 3, 1, 1).to(device)


# The paper (Sect. 2.1): RGB, the training-set mean pixel subtracted, nothing else.
PAPER = Preprocessing("paper", "RGB", 1.0, (123.68, 116.779, 103.939))
# torchvision and timm weights.
IMAGENET = Preprocessing("imagenet", "RGB", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# The released Caffe models and their conversions: BGR 0–255 minus the mean pixel.
CAFFE = Preprocessing("caffe", "BGR", 1.0, (103.939, 116.779, 123.68))

PRESETS = {p.name: p for p in (PAPER, IMAGENET, CAFFE)}


def get_preprocessing(spec: str | Preprocessing) -> Preprocessing:
    """A preset by name (``paper``, ``imagenet``, ``caffe``) or a :class:`Preprocessing` as is."""
    if isinstance(spec, Preprocessing):
        return spec
    if spec not in PRESETS:
        raise ConfigError(f"unknown preprocessing {spec!r}; valid choices: {', '.join(PRESETS)}")
    return PRESETS[spec]
