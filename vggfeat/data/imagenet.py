"""ILSVRC-2012 folders and labels, in the class order torchvision and timm weights use.

The order is the sorted WordNet ids (``vggfeat/data/imagenet_classes.tsv``, also
``datasets/imagenet/classes.tsv``).  Validation images may be

* in class folders named by WordNet id (``val/n01440764/ILSVRC2012_val_00000293.JPEG``), as
  torchvision's ``ImageFolder`` expects — a subset of the classes is fine; or
* flat (``val/ILSVRC2012_val_00000001.JPEG``), labelled by the devkit
  (``ILSVRC2012_devkit_t12/data/meta.mat`` + ``ILSVRC2012_validation_ground_truth.txt``, whose ids
  are the devkit's, not torchvision's) or by a ``filename,wnid`` CSV such as Kaggle's
  ``LOC_val_solution.csv``.
"""

from __future__ import annotations

import csv
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .sources import ImageList, InputError, gather_images, is_image_file
from ..optional import require


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(wnids, names) of the 1000 classes, index = torchvision/timm class index."""
    text = resources.files("vggfeat.data").joinpath("imagenet_classes.tsv").read_text("utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    return tuple(r[1] for r in rows), tuple(r[2] for r in rows)


def wnid_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_classes()[0])}


def imagenet_folder(root: str | os.PathLike, *, devkit: str | os.PathLike | None = None,
                    labels_csv: str | os.PathLike | None = None) -> ImageList:
    """The images of an ImageNet train/val folder with labels in torchvision/timm class order."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"ImageNet folder {root} does not exist")
    index = wnid_index()
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir())
    if subdirs:
        unknown = [d for d in subdirs if d not in index]
        if unknown:
            raise InputError(f"{root}: sub-folders must be ImageNet WordNet ids (n01440764 …); "
                             f"{unknown[:3]} are not")
        images = gather_images([root])
        images.labels = [index[images.class_names[y]] for y in images.labels]
    else:
        paths = sorted(str(p.resolve()) for p in root.iterdir() if is_image_file(p))
        if devkit is not None:
            by_name = _devkit_labels(Path(devkit))
        elif labels_csv is not None:
            by_name = _csv_labels(Path(labels_csv))
        else:
            raise InputError(f"{root} holds images but no class folders: give the devkit folder "
                             "(--devkit ILSVRC2012_devkit_t12) or a filename,wnid CSV (--labels)")
        missing = [p for p in paths if Path(p).stem not in by_name]
        if missing:
            raise InputError(f"no label for {len(missing)} image(s), e.g. {missing[0]}")
        images = ImageList(paths, [index[by_name[Path(p).stem]] for p in paths])
    images.class_names = list(imagenet_classes()[0])
    return images


def _devkit_labels(devkit: Path) -> dict[str, str]:
    """image stem → wnid from the devkit's meta.mat and validation ground truth."""
    loadmat = require("scipy.io", "devkit", "reading the ILSVRC devkit's meta.mat").loadmat

    meta_path = devkit / "data" / "meta.mat"
    truth_path = devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"
    for path in (meta_path, truth_path):
        if not path.is_file():
            raise InputError(f"devkit file {path} is missing (expected the ILSVRC2012_devkit_t12 "
                             "layout)")
    synsets = loadmat(str(meta_path), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets
                  if int(s["num_children"]) == 0}
    truth = [int(line) for line in truth_path.read_text().split()]
    return {f"ILSVRC2012_val_{i + 1:08d}": id_to_wnid[t] for i, t in enumerate(truth)}


def _csv_labels(path: Path) -> dict[str, str]:
    """image stem → wnid from ``ImageId,PredictionString`` (Kaggle) or ``filename,wnid`` rows."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if len(row) >= 2 and row[1].split() and row[1].split()[0].startswith("n"):
                out[Path(row[0]).stem] = row[1].split()[0]
    if not out:
        raise InputError(f"{path}: no 'filename,wnid' rows found")
    return out
