"""Per-layer CPU times of VGG-16's layers: torch's own (eager) against the winograd backend's.

For each 3×3 layer (Winograd F(4×4, 3×3) with the ReLU fused, against ``conv2d`` + ReLU) and
for fc6/fc7 applied densely (im2col GEMM against torch's k×k convolution), on the maps an
``--size`` input (an image and its flip: ``--batch 2``) produces, prints the best of
``--repeats`` times, the speed-up and the largest relative difference of the outputs.

    python benchmarks/cpu_layers.py                    # Q = 384 of a 4:3 photo: 384×512
    python benchmarks/cpu_layers.py --size 224x224 --batch 1
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import vggfeat
from vggfeat.models.backends import with_backend
from vggfeat.models.winograd import load_kernels


def best_time(fn, x, repeats: int) -> float:
    fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="D")
    parser.add_argument("--size", default="384x512", help="input height×width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, kernels {'built' if load_kernels() else 'unavailable'}")
    print(f"# VGG {args.arch}, input {args.batch}×3×{height}×{width}, best of {args.repeats}")
    model = vggfeat.vgg(args.arch, weights="random").eval().to(memory_format=torch.channels_last)
    fast_model = with_backend(model, "winograd", reads=["fc7"])
    x = torch.rand(args.batch, 3, height, width).contiguous(memory_format=torch.channels_last)
    print(f"{'layer':8} {'shape (C→K, H×W)':22} {'eager ms':>9} {'fast ms':>9} {'speed-up':>9} "
          f"{'max rel Δ':>10}")
    totals = [0.0, 0.0]
    layers = [*model.features.named_children(), *model.head.named_children()]
    with torch.inference_mode():
        for name, layer in layers:
            fast = getattr(fast_model.features, name, None) or getattr(fast_model.head, name)
            if hasattr(fast, "fast"):
                eager_t = best_time(fast.eager, x, args.repeats)
                fast_t = best_time(fast.fast, x, args.repeats)
                want, got = fast.eager(x), fast.fast(x)
                rel = float((got - want).abs().max() / want.abs().max())
                shape = f"{x.shape[1]}→{want.shape[1]}, {x.shape[2]}×{x.shape[3]}"
                print(f"{name:8} {shape:22} {eager_t * 1e3:9.1f} {fast_t * 1e3:9.1f} "
                      f"{eager_t / fast_t:8.2f}× {rel:10.1e}")
                totals[0] += eager_t
                totals[1] += fast_t
            x = layer(x)
            if name == "fc7":
                break
    print(f"{'total':31} {totals[0] * 1e3:9.1f} {totals[1] * 1e3:9.1f} "
          f"{totals[0] / totals[1]:8.2f}×")


if __name__ == "__main__":
    main()
