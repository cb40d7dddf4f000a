"""Fine-tuning vs linear classifiers on fixed features, on a small real dataset, on a CPU.

scikit-learn's handwritten digits (8×8, upscaled to 256×256 PNG files) are split by class: a
reduced-width net A is first trained from scratch on digits 0–4 (the "pretrained" net), then
transferred to digits 5–9 with only ``--per-class`` training images per class:

* linear: fc7 descriptors of the pretrained net (dense at Q=256, flip-averaged, L2-normalised,
  as ``vggfeat extract``) and a linear SVM, C chosen by 3-fold cross-validation (the paper's way);
* fine-tune: ``vggfeat train --weights pretrained --freeze conv`` (fc6–fc8 trained) and
  ``--freeze none`` (everything), new fc8 for the 5 classes.

All are scored on the same held-out images of digits 5–9.

    python benchmarks/finetune_vs_linear.py --out runs/transfer-digits
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV
from sklearn.svm import LinearSVC

import vggfeat
from vggfeat.descriptors import DescriptorSpec
from vggfeat.train import Recipe, train

SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


def write_split(root: Path, classes: tuple[int, ...], per_class: int | None, seed: int = 0) -> Path:
    """root/train and root/val class folders of the given digits; ``per_class`` training images
    per class (None: 80%), the rest in val."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for c in classes:
        members = rng.permutation(np.flatnonzero(digits.target == c))
        n_train = per_class or int(0.8 * len(members))
        for split, indices in (("train", members[:n_train]), ("val", members[n_train:])):
            for i in indices:
                path = root / split / str(c) / f"{i:04d}.png"
                if path.exists():
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
                Image.fromarray(pixels).convert("RGB").resize((256, 256), Image.BILINEAR).save(path)
    return root


def recipe(name: str, **changes) -> Recipe:
    base = dict(name=name, arch="A", width_mult=1 / 16, fc_dim=128, batch_size=32, flip=False,
                preprocessing="imagenet", workers=1, patience=1, seed=0)
    return Recipe(**{**base, **changes})


def linear(weights: Path, data: Path, out: Path) -> tuple[float, float]:
    """Top-1 error (%) of a linear SVM on fixed fc7 descriptors, and the seconds it took."""
    tic = time.monotonic()
    spec = DescriptorSpec(layer="fc7", scales=(256,))
    sets = {}
    for split in ("train", "val"):
        path = out / f"fc7-{split}.h5"
        vggfeat.extract([data / split], path, spec=spec, weights=str(weights), device="cpu",
                        progress=False)
        sets[split] = vggfeat.load_features(path, return_X_y=True)
    (X, y), (X_val, y_val) = sets["train"], sets["val"]
    search = GridSearchCV(LinearSVC(max_iter=10000), {"C": [0.1, 1, 10, 100]}, cv=3).fit(X, y)
    return 100 * (1 - search.score(X_val, y_val)), time.monotonic() - tic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/transfer-digits")
    parser.add_argument("--per-class", type=int, default=20,
                        help="training images per target class")
    parser.add_argument("--source-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=0.08,
                        help="lr per 256 images with --freeze conv (0.0025 at the batch of 8)")
    parser.add_argument("--lr-all", type=float, default=0.001,
                        help="lr per 256 images with --freeze none (every layer trained; "
                             "vggfeat train's default with --weights)")
    args = parser.parse_args()
    out = Path(args.out)
    warnings.simplefilter("ignore", vggfeat.NewHeadWarning)  # expected: new fc8 for 5 classes

    pretrained = out / "source" / "final.safetensors"
    if not pretrained.exists():  # a finished source run is reused as it is
        train(recipe("source", epochs=args.source_epochs, lr=0.08),
              write_split(out / "source-data", SOURCE, None), out / "source", device="cpu",
              resume=True, progress=False)
    source_error = vggfeat.vgg(weights=pretrained).weights_meta["metrics"]["val_top1_error"]
    target = write_split(out / "target-data", TARGET, args.per_class)
    print(f"pretrained on digits 0-4: val top-1 error {source_error:.1f}%")
    print(f"target: digits 5-9, {args.per_class} training images per class\n")
    rows = [("linear SVM on fixed fc7", *linear(pretrained, target, out))]
    for freeze, lr in (("conv", args.lr), ("none", args.lr_all)):
        tic = time.monotonic()
        run = train(recipe(f"finetune-{freeze}", weights=str(pretrained), freeze=freeze,
                           epochs=args.epochs, batch_size=8, lr=lr),
                    target, out / f"finetune-{freeze}-lr{lr:g}", device="cpu", resume=True,
                    progress=False)
        best = min(row["val_top1_error"] for row in run.history)
        rows.append((f"fine-tune, --freeze {freeze}, lr {lr:g} (best epoch)", best,
                     time.monotonic() - tic))
    print("| method | val top-1 error (%) | seconds |\n|---|---|---|")
    for name, error, seconds in rows:
        print(f"| {name} | {error:.1f} | {seconds:.0f} |")
    print(f"\nchance: 80% error; torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
