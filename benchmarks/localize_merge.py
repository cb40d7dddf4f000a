"""Cost of the greedy box merge of dense localisation, against the dense forward pass it follows.

At test scale Q the localisation net gives a box per class at every map position, for the image
and its flip; the merge runs on the boxes of the top-5 classes.  For a 4:3 image at Q=512 the map
is 10×15, so one PCR net gives 2 × 150 boxes per class and 1,500 for the top 5.  The boxes here
imitate a trained net's: most windows see the object and predict its box with noise (σ = 8% of
its size), the rest are scattered.  The forward pass is a full-width net D with a PCR head (4,000
outputs) and the classification net D, each on the image and its flip, as ``vggfeat localize
evaluate --method dense`` runs them.

    python benchmarks/localize_merge.py                  # Q=512, top 5, PCR, 1 net
    python benchmarks/localize_merge.py --nets 2 --scales 352,384
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

import vggfeat
from vggfeat.localize.merge import best_boxes
from vggfeat.models.vgg import score_map_size


def dense_like_boxes(rng: np.random.Generator, groups: int, n: int, width: int, height: int
                     ) -> np.ndarray:
    """groups×n×4 boxes: 70% around one object per group, 30% anywhere."""
    out = np.empty((groups, n, 4))
    for g in range(groups):
        w, h = rng.uniform(0.2, 0.7) * width, rng.uniform(0.2, 0.7) * height
        cx, cy = rng.uniform(w / 2, width - w / 2), rng.uniform(h / 2, height - h / 2)
        centre = np.array([cx, cy]) + rng.normal(0, 0.08, (n, 2)) * [w, h]
        size = np.array([w, h]) * np.exp(rng.normal(0, 0.08, (n, 2)))
        scattered = rng.random(n) < 0.3
        centre[scattered] = rng.uniform(0, 1, (scattered.sum(), 2)) * [width, height]
        size[scattered] = rng.uniform(0.1, 0.8, (scattered.sum(), 2)) * [width, height]
        out[g] = np.concatenate([centre - size / 2, centre + size / 2], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="512", help="test scales Q, comma-separated")
    parser.add_argument("--nets", type=int, default=1, help="localisation nets merged together")
    parser.add_argument("--top", type=int, default=5, help="classes whose boxes are merged")
    parser.add_argument("--images", type=int, default=20, help="merges timed")
    parser.add_argument("--aspect", type=float, default=4 / 3, help="image width / height")
    parser.add_argument("--forward", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the full-width dense forward passes (D, PCR)")
    parser.add_argument("--device", default="cpu", help="where the forward passes run")
    parser.add_argument("--amp", choices=["bf16", "fp32"], default="fp32",
                        help="autocast dtype of the forward passes")
    args = parser.parse_args()
    scales = [int(q) for q in args.scales.split(",")]
    rng = np.random.default_rng(0)

    per_class = 0
    for q in scales:
        h, w = score_map_size(q, int(q * args.aspect))
        per_class += 2 * h * w * args.nets
    boxes = [dense_like_boxes(rng, args.top, per_class, 683, 512) for _ in range(args.images)]
    scores = [rng.uniform(0, 1, (args.top, per_class)) for _ in range(args.images)]
    best_boxes(boxes[0], scores[0])  # warm-up
    tic = time.perf_counter()
    for b, s in zip(boxes, scores):
        best_boxes(b, s)
    merge_ms = (time.perf_counter() - tic) / args.images * 1000
    print(f"boxes per image: {per_class * args.top} ({per_class} per class × top {args.top}; "
          f"Q={args.scales}, {args.nets} PCR net(s), image + flip)")
    print(f"greedy merge: {merge_ms:.1f} ms per image (mean of {args.images})")

    if args.forward:
        device = torch.device(args.device)
        torch.manual_seed(0)
        nets = [(vggfeat.vgg("D", weights="random", num_classes=4000), args.nets),
                (vggfeat.vgg("D", weights="random"), 1)]
        nets = [(net.eval().to(device, memory_format=torch.channels_last), copies)
                for net, copies in nets]
        repeats = 1 if device.type == "cpu" else 10

        def forward() -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                        enabled=args.amp == "bf16"):
                for q in scales:
                    x = torch.randn(2, 3, q, int(q * args.aspect), device=device).contiguous(
                        memory_format=torch.channels_last)
                    for net, copies in nets:
                        for _ in range(copies):
                            net.score_map(x)

        if device.type == "cuda":
            forward()  # warm-up (cuDNN algorithm choice)
            torch.cuda.synchronize()
        tic = time.perf_counter()
        for _ in range(repeats):
            forward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        forward_ms = (time.perf_counter() - tic) / repeats * 1000
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"dense forward on {name} ({args.amp}; loc D-PCR ×{args.nets} + cls D, image + "
              f"flip): {forward_ms:.1f} ms per image; the merge is "
              f"{100 * merge_ms / forward_ms:.1f}% of it")
    print(f"torch {torch.__version__}, numpy {np.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
