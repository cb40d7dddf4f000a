"""End to end against what a user would write instead: a plain timm script, same descriptor.

The descriptor of the paper's Appendix B (VGG-16 fc7 applied densely at Q = 256, 384, 512, each
scale with its horizontal flip, averaged over positions, flips and scales, then L2-normalised),
computed two ways on the same JPEGs and the same weights, in turns (``--repeats``) so that both
see the same machine load:

* ``timm``: ``timm.create_model("vgg16")`` holding vggfeat's weights, eval, channels_last, and a
  loop in the main process: decode (PIL), rescale (torchvision, bilinear, antialiased),
  normalise, one forward per image and scale (the image and its flip), pool, average;
* ``vggfeat``: ``vggfeat.extract`` with its defaults (backend ``auto``, decoding workers).

Prints images/s of each turn, the best of each, their ratio (target on CPU: vggfeat ≥ 1.5×)
and the largest difference between the two descriptors.

    python benchmarks/timm_baseline.py                       # 4 JPEGs 800×600, 2 turns
    python benchmarks/timm_baseline.py --images 8 --sizes 1024x768 --repeats 3
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

import vggfeat
from vggfeat.descriptors import DescriptorSpec, extract
from vggfeat.models.convert import TIMM_FC

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_jpegs(folder: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """Smooth random photographs-like JPEGs, one per (width, height)."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (width, height) in enumerate(sizes):
        small = rng.integers(0, 255, (height // 32, width // 32, 3), dtype=np.uint8)
        paths.append(folder / f"{i:05d}.jpg")
        Image.fromarray(small).resize((width, height), Image.BICUBIC).save(paths[-1], quality=90)
    return paths


def timm_vgg16(model: vggfeat.VGG) -> torch.nn.Module:
    """timm's VGG-16 holding ``model``'s weights (vggfeat's layer names → timm's keys)."""
    index = {name: i for i, name in enumerate(model.features._modules)}
    fc = {v: k for k, v in TIMM_FC.items()}
    state = {}
    for key, value in model.state_dict().items():
        _, module, param = key.split(".")
        if key.startswith("features."):
            state[f"features.{index[module]}.{param}"] = value
        else:  # fc6, fc7: convolutions in both; fc8: timm's is a Linear
            state[f"{fc[module]}.{param}"] = value.flatten(1) if key == "head.fc8.weight" else value
    net = timm.create_model("vgg16", pretrained=False)
    net.load_state_dict(state)
    return net.eval().to(memory_format=torch.channels_last)


def timm_descriptors(net: torch.nn.Module, paths: list[Path], scales: tuple[int, ...]) -> np.ndarray:
    """The plain script: everything in the main process, one image and scale per forward."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    rows = []
    with torch.inference_mode():
        for path in paths:
            with Image.open(path) as img:
                image = TF.pil_to_tensor(img.convert("RGB"))
            per_scale = []
            for q in scales:
                view = TF.resize(image, [q], antialias=True)
                x = ((view[None].float() / 255 - mean) / std).contiguous(
                    memory_format=torch.channels_last)
                x = torch.cat([x, x.flip(-1)])
                fmap = net.pre_logits(net.forward_features(x))  # fc7 after its ReLU, densely
                per_scale.append(fmap.mean(dim=(2, 3)).mean(dim=0))
            rows.append(F.normalize(torch.stack(per_scale).mean(dim=0), dim=0))
    return torch.stack(rows).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--sizes", default="800x600", help="JPEG width×height, comma-separated")
    parser.add_argument("--scales", default="256,384,512")
    parser.add_argument("--batch-size", type=int, default=2, help="vggfeat.extract's")
    parser.add_argument("--repeats", type=int, default=2, help="turns of each")
    args = parser.parse_args()
    scales = tuple(int(q) for q in args.scales.split(","))
    shapes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    sizes = [shapes[i % len(shapes)] for i in range(args.images)]
    model = vggfeat.vgg("D", weights="random")
    net = timm_vgg16(model)
    spec = DescriptorSpec(layer="fc7", scales=scales)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, timm {timm.__version__}")
    print(f"# VGG-16 fc7, Q={scales}, flip, mean, L2; {args.images} JPEGs {args.sizes}; "
          f"vggfeat.extract batch {args.batch_size}, default backend and workers")
    rates: dict[str, list[float]] = {"timm": [], "vggfeat": []}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), sizes)
        for turn in range(args.repeats):
            start = time.perf_counter()
            ours = timm_descriptors(net, paths, scales)
            rates["timm"].append(len(paths) / (time.perf_counter() - start))
            out = Path(tmp) / f"turn{turn}.h5"
            start = time.perf_counter()
            extract([str(p) for p in paths], out, spec=spec, model=model,
                    batch_size=args.batch_size, progress=False)
            rates["vggfeat"].append(len(paths) / (time.perf_counter() - start))
            theirs = vggfeat.load_features(out).data
            print(f"turn {turn}: timm {rates['timm'][-1]:.3f} img/s, vggfeat "
                  f"{rates['vggfeat'][-1]:.3f} img/s, ratio "
                  f"{rates['vggfeat'][-1] / rates['timm'][-1]:.2f}×", flush=True)
    best = {k: max(v) for k, v in rates.items()}
    print(f"best: timm {best['timm']:.3f} img/s, vggfeat {best['vggfeat']:.3f} img/s, "
          f"vggfeat / timm {best['vggfeat'] / best['timm']:.2f}× (per turn: "
          + ", ".join(f"{v / t:.2f}×" for v, t in zip(rates["vggfeat"], rates["timm"]))
          + f"); largest descriptor difference {float(np.abs(ours - theirs).max()):.1e}")


if __name__ == "__main__":
    main()
