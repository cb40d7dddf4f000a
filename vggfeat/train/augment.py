"""The paper's training augmentation (Sect. 3.1), reproducible per image.

In the loader workers, on uint8 images: isotropic rescale so the smallest side is S (fixed, or
drawn per image from [Smin, Smax]), a random crop, a random horizontal flip
(torchvision.transforms.v2).  On the device, on floats: the AlexNet PCA colour shift, then the
weights' normalisation.  Each image's randomness comes from a seed derived from (run seed, epoch,
image index), so the result does not depend on the number of workers or processes, and a resumed
run sees exactly the images an uninterrupted one would have.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.transforms import v2

# AlexNet's PCA of ImageNet RGB pixels (RGB in [0, 1]): eigenvalues and eigenvectors (columns).
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009],
                           [-0.5808, -0.0045, -0.8140],
                           [-0.5836, -0.6948, 0.4203]])


def train_transform(scale_range: tuple[int, int], *, crop: int = 224, flip: bool = True
                    ) -> v2.Compose:
    """uint8 3×H×W → uint8 3×crop×crop: rescale (S or S ~ U{Smin…Smax}), random crop, flip."""
    lo, hi = scale_range
    rescale = v2.Resize(lo, antialias=True) if lo == hi else \
        v2.RandomShortestSize(list(range(lo, hi + 1)), antialias=True)
    steps = [rescale, v2.RandomCrop(crop)]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def derived_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on ``keys``: (seed, epoch, image index) for an image's
    augmentation, (seed, "dropout", rank, step) for dropout, whatever the workers and ranks."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> 1)


DROPOUT_STREAM = 1  # keeps the dropout keys (4 values) apart from the image keys (3 values)


def augment(image: Tensor, transform: v2.Compose, *, seed: int, lighting: float,
            sample: Callable[[Tensor, v2.Compose], tuple[Tensor, Any]] | None = None
            ) -> tuple[Tensor, Tensor, Any]:
    """One training view of ``image``, its colour-shift coefficients α (3) and its target, all
    seeded.  ``sample(image, transform)`` makes the view and the target together (a task's
    targets may move with the image, boxes say); without it the target is None.

    The global RNG is left as it was (forked), so dropout's random stream is not disturbed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        view, target = sample(image, transform) if sample else (transform(image), None)
        alphas = torch.randn(3) * lighting
    return view, alphas, target


def pca_lighting(images: Tensor, alphas: Tensor) -> Tensor:
    """Add Σᵢ αᵢ λᵢ pᵢ to every pixel: float N×3×H×W in 0–255 RGB, α N×3 → same shape."""
    eigval, eigvec = _pca_constants(alphas.device)
    shift = (alphas * eigval) @ eigvec.T  # N×3
    return images + 255.0 * shift[:, :, None, None]


@functools.lru_cache(maxsize=16)
def _pca_constants(device: torch.device) -> tuple[Tensor, Tensor]:
    # Copied to each device once, not on every micro-batch.
    return PCA_EIGVAL.to(device), PCA_EIGVEC.to(device)
