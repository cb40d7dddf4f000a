"""Running a VGG on a device: placement, input normalisation, autocast and same-shape batching.

Shared by the descriptor extractor and the ImageNet evaluator, which differ only in what they
compute from the network's outputs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import nullcontext

import torch
from torch import Tensor

from .vgg import VGG

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceRunner:
    """A VGG in eval mode, channels_last, on ``device``, fed uint8 RGB batches."""

    def __init__(self, model: VGG, *, device: str | torch.device = "cpu", batch_size: int = 8,
                 amp: str | None = None) -> None:
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of bf16, fp16 or None, got {amp!r}")
        self.model = model.eval().to(device, memory_format=torch.channels_last)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.amp_dtype = AMP_DTYPES[amp]

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def network_input(self, batch: Tensor) -> Tensor:
        """uint8 N×3×H×W → normalised float input on the device, channels_last."""
        x = batch.to(self.device, non_blocking=True)
        return self.model.preprocessing(x).contiguous(memory_format=torch.channels_last)

    def same_shape_chunks(self, views: list[Tensor]) -> Iterator[list[int]]:
        """Indices of ``views`` grouped by shape, in chunks of at most ``batch_size``."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, view in enumerate(views):
            groups[tuple(view.shape)].append(i)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                yield members[start:start + self.batch_size]
