"""One process against ``--engine ray`` with one actor: the cost of driving units through Ray.

Writes ``--images`` JPEGs, then extracts them into a fresh feature store, in turns, with
``vggfeat.extract`` (one process) and ``vggfeat.extract_with_ray`` on a local Ray instance
started once beforehand (one actor reserving every CPU, so torch gets the same threads as the
process), and prints a table: wall seconds (best of ``--repeats`` turns), images/s, and the
overhead of the Ray run over the single process, which is mostly fixed per run (starting the
actor: a Python process that imports torch and receives the net) and per unit (each unit reads
the store's index and publishes an entry).  The time to start Ray itself is printed apart.

    python benchmarks/engines.py                          # 24 images, VGG-16 at 1/4 width
    python benchmarks/engines.py --images 96 --unit-size 32 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import vggfeat
from vggfeat.descriptors import DescriptorSpec, extract


def write_jpegs(folder: Path, n: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    width, height = size
    for i in range(n):
        small = rng.integers(0, 255, (height // 32, width // 32, 3), dtype=np.uint8)
        Image.fromarray(small).resize((width, height), Image.BICUBIC).save(
            folder / f"{i:05d}.jpg", quality=90)


def timed(run, images: Path, store: Path, **kwargs) -> float:
    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    result = run([images], store, **kwargs)
    seconds = time.perf_counter() - start
    assert result.computed == result.num_images, result
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--width-mult", type=float, default=0.25)
    parser.add_argument("--scales", default="256,384,512")
    parser.add_argument("--unit-size", type=int, default=8, help="images per unit of work")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import ray

    size = tuple(int(v) for v in args.size.split("x"))
    model = vggfeat.vgg("D", weights="random", width_mult=args.width_mult).eval()
    spec = DescriptorSpec(scales=tuple(int(s) for s in args.scales.split(",")))
    common = dict(spec=spec, model=model, progress=False, backend=args.backend,
                  unit_images=args.unit_size)
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="engines", dir="/tmp") as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        write_jpegs(tmp / "images", args.images, size)
        extract([tmp / "images"], tmp / "warm-up", **common)  # the backend's choice, cached
        began = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
                 _temp_dir=str(tmp / "ray"))
        ray_start = time.perf_counter() - began
        times = {"one process": [], "ray, 1 actor": []}
        for _ in range(args.repeats):
            times["one process"].append(timed(extract, tmp / "images", tmp / "local", **common))
            times["ray, 1 actor"].append(timed(
                vggfeat.extract_with_ray, tmp / "images", tmp / "ray-store", actors=(1, 1),
                cpus_per_actor=cpus, **common))
        ray.shutdown()
    report(args, cpus, times, ray_start)


def report(args, cpus: int, times: dict[str, list[float]], ray_start: float) -> None:
    print(f"{platform.processor() or platform.machine()}, {cpus} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; torch {torch.__version__}, ray "
          f"{__import__('ray').__version__}; {args.images} JPEGs {args.size}, VGG-16 × "
          f"{args.width_mult}, Q = {args.scales}, units of {args.unit_size}, backend "
          f"{args.backend}; best of {args.repeats}")
    base = min(times["one process"])
    print(f"{'engine':<14} {'seconds':>8} {'img/s':>7} {'overhead':>9}")
    for name, values in times.items():
        best = min(values)
        print(f"{name:<14} {best:8.2f} {args.images / best:7.2f} "
              f"{100 * (best / base - 1):8.1f}%   (turns: "
              + ", ".join(f"{v:.2f}" for v in values) + ")")
    print(f"starting the local Ray instance (once, not counted above): {ray_start:.2f} s")


if __name__ == "__main__":
    main()
