"""Training throughput and model-FLOPs utilisation (MFU) of `vggfeat train`.

Three figures, same net, batch and precision:

* synthetic: forward + backward + SGD step on a fixed random batch already on the device
  (the compute ceiling of the training step);
* jpeg: the real `vggfeat.train` loop on generated JPEG files (decoding, rescaling, cropping,
  flipping in DataLoader workers; colour shift and normalisation on the device);
* reference (``--reference``): torchvision's VGG in a plain loop (SGD, fp32, contiguous), as
  torchvision's reference training script runs it.

MFU = 3 × forward FLOPs per 224² image (Table-1 MACs × 2) × img/s ÷ the device's peak: the dense
bf16 tensor-core peak on known GPUs (``--peak-tflops`` to override), or, on a CPU, the measured
fp32 matmul rate.

    python benchmarks/train.py --device cuda --amp bf16 --batch-size 256 --reference
    python benchmarks/train.py --device cpu --batch-size 8 --steps 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import vggfeat
from vggfeat.models.stats import count_macs
from vggfeat.train import Recipe, train

# Dense peaks (TFLOP/s) of the tensor cores in bf16/fp16, by device name fragment.
GPU_PEAKS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0,
             "H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1, "4090": 165.2}


def peak_tflops(device: torch.device, override: float | None) -> tuple[float, str]:
    if override:
        return override, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAKS.items():
            if key in name:
                return value, f"{name}, dense bf16"
        raise SystemExit(f"unknown GPU {name}: pass --peak-tflops")
    a = torch.randn(2048, 2048)
    a @ a
    tic = time.perf_counter()
    for _ in range(5):
        a @ a
    return 5 * 2 * 2048 ** 3 / (time.perf_counter() - tic) / 1e12, "measured fp32 matmul"


def synthetic(model, *, batch: int, device, amp, channels_last: bool, compile_: bool,
              steps: int, warmup: int) -> float:
    """img/s of the training step alone."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    forward = torch.compile(model) if compile_ else model
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, model.num_classes if hasattr(model, "num_classes") else 1000, (batch,),
                      device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        tic = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(forward(x).float(), y)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    return batch / statistics.median(times)


def jpeg_folder(root: Path, n: int, size: tuple[int, int]) -> Path:
    """train/ and val/ of ``n`` photo-sized JPEGs (smooth random content), two classes."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 4)):
        for i in range(count):
            base = rng.integers(0, 255, (size[0] // 16, size[1] // 16, 3), dtype=np.uint8)
            path = root / split / f"c{i % 2}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(base).resize(size[::-1], Image.BILINEAR).save(path, quality=90)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="D")
    parser.add_argument("--width-mult", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None)
    parser.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                        help="auto: on for GPUs, off for CPUs (as vggfeat train)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--jpeg-size", type=int, nargs=2, default=(375, 500),
                        help="H W of the generated JPEGs (ImageNet's typical 375×500)")
    parser.add_argument("--skip-jpeg", action="store_true")
    parser.add_argument("--reference", action="store_true",
                        help="also time torchvision's VGG in a plain fp32 loop")
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    channels_last = {"on": True, "off": False}.get(args.channels_last, device.type == "cuda")
    torch.backends.cudnn.benchmark = True
    model = vggfeat.vgg(args.arch, weights="random", width_mult=args.width_mult)
    flops = 3 * 2 * count_macs(model, 224)  # forward + backward ≈ 3 × forward
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    micro = args.micro_batch or args.batch_size
    print(f"VGG {model.spec.name} width ×{args.width_mult}, {flops / 1e9:.1f} GFLOP per training "
          f"image; device {device} ({peak:.3g} TFLOP/s peak, {peak_source}); batch "
          f"{args.batch_size} (micro {micro}), amp {args.amp}, channels_last "
          f"{channels_last}, compile {args.compile}")

    def report(label: str, rate: float) -> float:
        print(f"{label:<34} {rate:9.2f} img/s   MFU {100 * rate * flops / (peak * 1e12):5.1f}%")
        return rate

    rate_syn = report("synthetic (training step only)", synthetic(
        model, batch=micro, device=device, amp=args.amp,
        channels_last=channels_last, compile_=args.compile, steps=args.steps,
        warmup=args.warmup))
    if not args.skip_jpeg:
        with tempfile.TemporaryDirectory() as tmp:
            n = args.batch_size * (args.steps + args.warmup)
            data = jpeg_folder(Path(tmp) / "data", n, tuple(args.jpeg_size))
            recipe = Recipe(arch=args.arch, width_mult=args.width_mult, batch_size=args.batch_size,
                            micro_batch=args.micro_batch, amp=args.amp, compile=args.compile,
                            channels_last=channels_last, workers=args.workers,
                            epochs=1, checkpoint_minutes=1e9, preprocessing="imagenet")
            result = train(recipe, data, Path(tmp) / "run", device=args.device,
                           max_steps=args.steps + args.warmup, progress=False)
            # The loop does not wait for the GPU at every step (it reads the loss every 10):
            # total time over the timed steps, not a per-step median, gives the rate.
            timed = result.step_seconds[args.warmup:]
            rate_jpeg = report("jpeg (vggfeat train loop)", args.batch_size * len(timed) / sum(timed))
            print(f"{'jpeg / synthetic':<34} {rate_jpeg / rate_syn:9.2f}")
    if args.reference:
        import torchvision

        ref = getattr(torchvision.models, {"A": "vgg11", "B": "vgg13", "D": "vgg16",
                                           "E": "vgg19"}[model.spec.config])()
        rate_ref = report("torchvision reference (fp32)", synthetic(
            ref, batch=micro, device=device, amp=None, channels_last=False, compile_=False,
            steps=args.steps, warmup=args.warmup))
        print(f"{'vggfeat synthetic / reference':<34} {rate_syn / rate_ref:9.2f}")


if __name__ == "__main__":
    main()
