"""Folder-per-class datasets (Caltech-101, Caltech-256, your own).

:func:`image_folder` finds what ``vggfeat extract`` finds in a folder (images in sub-folders,
recursively), as scikit-learn's ``(paths, y, class_names)``.  The Caltech protocols take one
level, images only (:func:`class_folders`): Caltech-256's ``056.dog/greg/`` holds copies of
images already in ``056.dog/``; recursing would count them twice.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .imagenet import imagenet_classes, imagenet_folder, wnid_index
from .sources import ImageList, InputError, gather_images, is_image_file

CALTECH_FOLDERS = {"caltech101": "101_ObjectCategories", "caltech256": "256_ObjectCategories"}


class LabelledImages(NamedTuple):
    """Image paths, their integer labels, and the class name of each label."""

    paths: list[str]
    y: np.ndarray
    class_names: list[str]


def image_folder(root: str | os.PathLike) -> LabelledImages:
    """The images of ``root/CLASS/…`` as ``(paths, y, class_names)``, ready for
    :class:`vggfeat.sklearn.VGGFeatures` and scikit-learn::

        paths, y, class_names = vggfeat.image_folder("photos/")
        X = VGGFeatures(progress=True).fit_transform(paths)

    The images and labels are the ones ``vggfeat extract root`` stores: every image file under
    each first-level sub-folder (sorted, absolute paths), classes in sorted folder order
    (torchvision's ``ImageFolder`` order), ``y[i]`` indexing ``class_names``.  Entries the scan
    leaves out (a link that loops back, …) are named in a warning.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist")
    images = gather_images([root])
    if images.labels is None:
        raise InputError(f"{root} is not a class-folder tree: put every image in the sub-folder "
                         f"of its class ({root}/CLASS/…)")
    if images.skipped:
        path, reason = images.skipped[0]
        more = f" and {len(images.skipped) - 1} more" if len(images.skipped) > 1 else ""
        warnings.warn(f"{root}: left out {path} ({reason}){more}", stacklevel=2)
    return LabelledImages(list(images.paths), np.asarray(images.labels, dtype=np.int64),
                          list(images.class_names))


def class_folders(root: str | os.PathLike) -> ImageList:
    """Images of ``root/CLASS/*`` with classes in sorted folder order (torchvision's order)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset folder {root} does not exist")
    paths, labels, names = [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in folder.iterdir() if f.is_file() and is_image_file(f))
        if not files:
            continue
        names.append(folder.name)
        paths.extend(os.path.abspath(f) for f in files)
        labels.extend([len(names) - 1] * len(files))
    if len(names) < 2:
        raise InputError(f"{root} should hold one sub-folder of images per class; found "
                         f"{len(names)} class folder(s) with images")
    return ImageList(paths, labels, names, [str(root)])


def caltech_root(root: str | os.PathLike, protocol: str) -> Path:
    """``101_ObjectCategories``/``256_ObjectCategories`` itself or a folder above it."""
    root = Path(root)
    folder = CALTECH_FOLDERS[protocol]
    for candidate in (root, root / folder, *sorted(root.glob(f"*/{folder}"))):
        if candidate.name == folder and candidate.is_dir():
            return candidate
    raise InputError(f"no {folder}/ folder in {root}; unpack the {protocol} archive there "
                     f"(see datasets/{protocol}/README.md)")


def net_class_names(model) -> list[str] | None:
    """The classes of a net's outputs, in order: those its weights record (``vggfeat train``
    writes them), ImageNet's WordNet ids for a 1000-class net, else ``None`` (unknown)."""
    recorded = model.weights_meta.get("class_names")
    if recorded:
        return list(recorded)
    return list(imagenet_classes()[0]) if model.num_classes == 1000 else None


def folder_for_net(root: str | os.PathLike, model, *, devkit: str | os.PathLike | None = None,
                   labels_csv: str | os.PathLike | None = None) -> ImageList:
    """:func:`labelled_folder` labelled in ``model``'s class order; folders that are not the
    net's classes are refused, never mapped to whatever classes come first."""
    names = net_class_names(model)
    images = labelled_folder(root, class_names=names, devkit=devkit, labels_csv=labels_csv)
    if names is None and len(images.class_names) != model.num_classes:
        raise InputError(f"{root} holds {len(images.class_names)} class folders, but the net has "
                         f"{model.num_classes} classes and its weights do not record which is "
                         "which; use weights saved by vggfeat train (they record class_names)")
    return images


def labelled_folder(root: str | os.PathLike, *, class_names: list[str] | None = None,
                    devkit: str | os.PathLike | None = None,
                    labels_csv: str | os.PathLike | None = None) -> ImageList:
    """Labelled images for training or evaluation.

    ImageNet folders (WordNet-id class folders, or flat val images with ``devkit``/``labels_csv``)
    get torchvision/timm's class order; other class folders get ``class_names``' order (e.g. the
    classes a net was trained on, recorded in its weights), by default their sorted names.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(f"image folder {root} does not exist")
    subdirs = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not subdirs or (class_names is None and all(d in wnid_index() for d in subdirs)):
        return imagenet_folder(root, devkit=devkit, labels_csv=labels_csv)
    images = gather_images([root])
    if images.labels is None:
        raise InputError(f"{root} must hold one sub-folder of images per class")
    names = list(class_names or images.class_names)
    index = {c: i for i, c in enumerate(names)}
    unknown = sorted(set(images.class_names) - set(index))
    if unknown:
        expected = ("folders named by WordNet id (n01440764 … n15075141, ILSVRC-2012's), or "
                    "flat images with the devkit or a labels CSV" if len(names) == 1000 and
                    set(names) == set(wnid_index()) else
                    f"folders named as its classes: {', '.join(names[:5])}"
                    + (" …" if len(names) > 5 else ""))
        raise InputError(f"{root}: class folders {', '.join(unknown[:3])}"
                         f"{' …' if len(unknown) > 3 else ''} are not classes of the net; "
                         f"its {len(names)} classes need {expected}")
    images.labels = [index[images.class_names[y]] for y in images.labels]
    images.class_names = names
    return images
