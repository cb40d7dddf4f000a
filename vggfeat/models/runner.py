"""Running a VGG on a device: placement, input normalisation, autocast and same-shape batching.

Shared by the descriptor extractor and the ImageNet evaluator, which differ only in what they
compute from the network's outputs.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor

from ..devices import resolve_device
from ..errors import ConfigError
from .vgg import VGG

AMP_DTYPES = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def placed_device(device: str | torch.device) -> torch.device:
    """A checked device, ``cuda`` → ``cuda:N`` of the current GPU, so that it compares equal to
    the device of a tensor placed there."""
    device = resolve_device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def memory_format_of(model: torch.nn.Module) -> torch.memory_format:
    """channels_last if the first convolution's weight is laid out so, else contiguous."""
    weight = next(p for p in model.parameters() if p.dim() == 4)
    if not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class DeviceRunner:
    """A VGG in eval mode on ``device``, fed uint8 RGB batches.

    The caller's model is never changed: if it is not already in eval mode on ``device`` in the
    asked memory format (channels_last, faster for inference on GPUs and CPUs alike, unless
    ``channels_last=False``), the runner works on a copy placed there (``self.model``).
    """

    def __init__(self, model: VGG, *, device: str | torch.device = "cpu", batch_size: int = 8,
                 amp: str | None = None, channels_last: bool = True) -> None:
        if amp not in AMP_DTYPES:
            raise ConfigError(f"amp must be one of fp32, bf16, fp16 or None, got {amp!r}")
        self.device = placed_device(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        on_device = next(model.parameters()).device == self.device
        if model.training or not on_device or memory_format_of(model) != self.memory_format:
            model = copy.deepcopy(model).eval().to(self.device, memory_format=self.memory_format)
        self.model = model
        self.batch_size = batch_size
        self.amp_dtype = AMP_DTYPES[amp]

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def network_input(self, batch: Tensor) -> Tensor:
        """uint8 N×3×H×W → normalised float input on the device, in the model's memory format."""
        x = batch.to(self.device, non_blocking=True)
        return self.model.preprocessing(x).contiguous(memory_format=self.memory_format)

    def same_shape_chunks(self, views: list[Tensor]) -> Iterator[list[int]]:
        """Indices of ``views`` grouped by shape, in chunks of at most ``batch_size``."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, view in enumerate(views):
            groups[tuple(view.shape)].append(i)
        for members in groups.values():
            for start in range(0, len(members), self.batch_size):
                yield members[start:start + self.batch_size]


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """``torch.backends.cudnn.benchmark`` set for a block and restored after it.

    Benchmarking pays off when shapes repeat (training crops) and costs a search per new shape
    (dense evaluation, where every image size differs).
    """
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@contextmanager
def tf32_matmuls(enabled: bool = True) -> Iterator[None]:
    """TF32 tensor-core matmuls on Ampere and later GPUs for a block, restored after it.

    float32 matmuls then round their inputs to 10 mantissa bits (convolutions already do so by
    default); fc6–fc8 and any float32 run get tensor-core speed.
    """
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
