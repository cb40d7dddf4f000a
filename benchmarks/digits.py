"""A real training run on a CPU in minutes: scikit-learn's handwritten digits, upscaled.

The 1,797 8×8 digit images (10 classes) are written as 256×256 PNG files in train/ and val/
class folders (80/20, stratified), then a reduced-width net A is trained with `vggfeat train`
(the same recipe code as the ImageNet runs: S=256, random 224 crops, colour shift, SGD). Flips are
off: a mirrored digit is another symbol. It prints the validation error per epoch; chance is 90%.

    python benchmarks/digits.py --epochs 4 --out runs/digits
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from vggfeat.train import Recipe, train


def write_digits(root: Path) -> Path:
    digits = load_digits()
    train_idx, val_idx = train_test_split(np.arange(len(digits.target)), test_size=0.2,
                                          stratify=digits.target, random_state=0)
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for i in indices:
            pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
            path = root / split / str(digits.target[i]) / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).convert("RGB").resize((256, 256), Image.BILINEAR).save(path)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/digits")
    parser.add_argument("--data", default="runs/digits-data")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--width-mult", type=float, default=1 / 16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.08,
                        help="per 256 images: 0.01 at the batch of 32")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    data = Path(args.data)
    if not (data / "val").is_dir():
        write_digits(data)
    recipe = Recipe(name="digits", arch="A", width_mult=args.width_mult, fc_dim=128,
                    batch_size=args.batch_size, epochs=args.epochs, lr=args.lr, flip=False,
                    preprocessing="imagenet", workers=args.workers, patience=1)
    tic = time.monotonic()
    result = train(recipe, data, args.out, device="cpu", resume=True)
    minutes = (time.monotonic() - tic) / 60
    print(f"{'epoch':>5} {'loss':>8} {'val top-1 err %':>16} {'img/s':>7}")
    for row in result.history:
        print(f"{row['epoch']:>5} {row['train_loss']:8.3f} {row['val_top1_error']:16.2f} "
              f"{row['images_per_s']:7.1f}")
    print(f"{minutes:.1f} min on the CPU; chance is 90% error; weights: {result.final}")


if __name__ == "__main__":
    main()
