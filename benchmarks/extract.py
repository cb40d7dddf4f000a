"""Extraction throughput: forward-only on synthetic tensors vs end-to-end `vggfeat extract`.

Writes real-size JPEGs (1024×768 by default; ``--sizes`` mixes aspect ratios in a shuffled
order), then prints

* the backend running the net,
* forward-only images/s: the dense descriptor net alone (flips and all scales) on full batches
  of tensors of the sizes those JPEGs become,
* end-to-end images/s: ``vggfeat.extract`` on the files (decode, rescale, network, HDF5 cache),
* their ratio (target on CPU: ≥ 0.9),
* images per forward: the mean number of images in an end-to-end forward pass (flips not
  counted); ``--batch-size`` at most.

    python benchmarks/extract.py                      # VGG-16, Q = 256,384,512, CPU
    python benchmarks/extract.py --device cuda --amp bf16 --images 512 --batch-size 32 \
        --sizes 1024x768,768x1024,1024x1024           # shuffled photos in 3 aspect ratios
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vggfeat
from vggfeat.data.images import resize_short_side
from vggfeat.extract import DescriptorNet, DescriptorSpec, extract
from vggfeat.devices import default_workers


def write_jpegs(folder: Path, sizes: list[tuple[int, int]]) -> None:
    """One JPEG per (width, height), named in list order."""
    rng = np.random.default_rng(0)
    for i, (width, height) in enumerate(sizes):
        small = rng.integers(0, 255, (height // 32, width // 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.BICUBIC).save(
            folder / f"{i:05d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="D")
    parser.add_argument("--width-mult", type=float, default=1.0)
    parser.add_argument("--scales", default="256,384,512")
    parser.add_argument("--layer", default="fc7")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--sizes", default="1024x768",
                        help="JPEG width×height, or several (comma-separated) in a shuffled order")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    args = parser.parse_args()
    scales = tuple(int(q) for q in args.scales.split(","))
    shapes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    order = np.random.default_rng(0).permutation(args.images) % len(shapes)
    sizes = [shapes[k] for k in order]  # each shape in turn, shuffled
    spec = DescriptorSpec(layer=args.layer, scales=scales)
    model = vggfeat.vgg(args.arch, weights="random", width_mult=args.width_mult)
    net = DescriptorNet(model, spec, device=args.device, batch_size=args.batch_size, amp=args.amp)
    workers = default_workers() if args.workers is None else args.workers
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, device {args.device}, amp {args.amp}")
    print(f"# VGG {args.arch} ×{args.width_mult}, layer {args.layer}, Q={scales}, flip, "
          f"{args.images} JPEGs {args.sizes}, batch {args.batch_size}, workers {workers}")
    print("backend:      eager")

    batches = []  # a full batch of each JPEG size
    for width, height in shapes:
        frame = torch.zeros(3, height, width, dtype=torch.uint8)
        batches.append([[resize_short_side(frame, q) for q in scales]] * args.batch_size)
        net(batches[-1])  # warm-up: allocator, kernels
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sync()
    start, done = time.perf_counter(), 0
    while done < args.images:
        net(batches[done // args.batch_size % len(batches)])
        done += args.batch_size
    sync()
    forward = done / (time.perf_counter() - start)
    print(f"forward-only: {forward:.3f} img/s")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        folder.mkdir()
        write_jpegs(folder, sizes)
        start = time.perf_counter()
        result = extract([folder], Path(tmp) / "out.h5", spec=spec, model=model,
                         batch_size=args.batch_size, workers=workers, device=args.device,
                         amp=args.amp, progress=False)
        end_to_end = result.num_images / (time.perf_counter() - start)
    print(f"end-to-end:   {end_to_end:.3f} img/s ({result.num_images} JPEGs, HDF5 cache included)")
    print(f"ratio:        {end_to_end / forward:.3f}")
    print(f"images per forward: {result.images_per_forward:.1f} (batch size {args.batch_size})")


if __name__ == "__main__":
    main()
