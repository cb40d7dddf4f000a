"""A picture of what dense evaluation sees: the top class's score map over the image."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.imagenet import imagenet_classes
from ..data.images import read_image, resize_short_side
from ..devices import default_device
from ..errors import ConfigError
from ..fileio import atomic_path
from ..models.runner import placed_device
from ..models.vgg import VGG
from ..optional import require


@torch.inference_mode()
def plot_score_map(model: VGG, image_path: str | os.PathLike, output: str | os.PathLike, *,
                   scale: int = 384, class_index: int | None = None,
                   device: str | torch.device | None = None) -> tuple[int, float]:
    """Write a PNG of the image rescaled to ``scale`` with the class score map overlaid.

    The map is the dense net's softmax for ``class_index`` (default: the top class of the
    spatially averaged scores) at each location, upsampled to the image.  Returns the class and
    its posterior.  The picture's format follows ``output``'s suffix (PNG when it has none).
    The net runs on ``device`` (default: cuda when available, else cpu); the caller's model is
    not moved (a copy runs there when it lives elsewhere).
    """
    # A bare Figure renders with Agg on its own: no pyplot, no global backend switch.
    Figure = require("matplotlib.figure", "plot", "vggfeat scoremap").Figure

    if class_index is not None and not 0 <= class_index < model.num_classes:
        raise ConfigError(f"class {class_index} does not exist: the net has {model.num_classes} "
                          f"classes, 0 … {model.num_classes - 1}")
    image = resize_short_side(read_image(image_path), scale)
    placed = placed_device(device or default_device())
    net = model if next(model.parameters()).device == placed else copy.deepcopy(model).to(placed)
    was_training = net.training
    try:  # eval mode (dropout off) for the map; the caller's model gets its mode back
        x = net.preprocessing(image[None].to(placed))
        scores = net.eval().score_map(x)[0].float().cpu()  # K×h×w
    finally:
        net.train(was_training)
    probs = scores.softmax(0)
    posterior = scores.mean((1, 2)).softmax(0)
    k = int(posterior.argmax()) if class_index is None else class_index
    heat = F.interpolate(probs[k][None, None], size=image.shape[-2:], mode="bilinear",
                         align_corners=False)[0, 0]
    names = imagenet_classes()[1] if model.num_classes == 1000 else None
    label = names[k].split(",")[0] if names else f"class {k}"
    fig = Figure(figsize=(image.shape[2] / 100, image.shape[1] / 100 + 0.4), dpi=100)
    ax = fig.subplots()
    ax.imshow(image.permute(1, 2, 0).numpy())
    overlay = ax.imshow(heat.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=max(1e-6, float(heat.max())))
    fig.colorbar(overlay, ax=ax, fraction=0.03, pad=0.01)
    ax.set_title(f"{label}: p={posterior[k]:.3f}, score map {tuple(probs.shape[1:])} at Q={scale}",
                 fontsize=8)
    ax.axis("off")
    output = Path(output)
    with atomic_path(output) as tmp:
        fig.savefig(tmp, bbox_inches="tight", format=output.suffix.lstrip(".").lower() or "png")
    return k, float(posterior[k])
