"""PASCAL VOC 2007/2012 classification sets, read from the devkit's own files.

The image lists come from ``ImageSets/Main/{train,val,trainval,test}.txt`` and the labels from the
XML annotations, as the VOC devkit builds its classification ground truth: an image is positive
for a class if it holds an object of that class that is not marked difficult; if all its objects
of that class are difficult the label is 0 ("difficult": ignored when scoring, and left out when
training that class); otherwise it is negative (-1).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sources import InputError

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")
POSITIVE, DIFFICULT, NEGATIVE = 1, 0, -1


@dataclass
class MultiLabelSet:
    """Images with a label per class: 1 present, 0 difficult only, -1 absent (N×K int8)."""

    paths: list[str]
    ids: list[str]
    labels: np.ndarray
    class_names: tuple[str, ...] = VOC_CLASSES

    def __len__(self) -> int:
        return len(self.paths)


def voc_root(root: str | os.PathLike, year: str) -> Path:
    """``VOC{year}`` itself, or the ``VOCdevkit`` folder holding it, or the folder above that."""
    root = Path(root)
    for candidate in (root, root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"):
        if (candidate / "ImageSets" / "Main").is_dir() and (candidate / "Annotations").is_dir():
            return candidate
    raise InputError(f"{root} is not a VOC{year} folder: expected ImageSets/Main/ and Annotations/ "
                     f"in it, in {root}/VOC{year}/ or in {root}/VOCdevkit/VOC{year}/ "
                     f"(see datasets/voc{year}/README.md)")


def read_voc(root: str | os.PathLike, year: str, image_set: str) -> MultiLabelSet:
    """The images of ``ImageSets/Main/{image_set}.txt`` with labels from their XML annotations."""
    base = voc_root(root, year)
    list_file = base / "ImageSets" / "Main" / f"{image_set}.txt"
    if not list_file.is_file():
        hint = (" VOC2012's test annotations are not public: its test set is scored by the "
                "evaluation server" if year == "2012" and image_set == "test" else "")
        raise InputError(f"{list_file} does not exist; the {image_set} set of VOC{year} is missing "
                         f"from this copy.{hint}")
    ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    labels = np.full((len(ids), len(VOC_CLASSES)), NEGATIVE, dtype=np.int8)
    index = {c: k for k, c in enumerate(VOC_CLASSES)}
    paths = []
    for i, image_id in enumerate(ids):
        xml = base / "Annotations" / f"{image_id}.xml"
        try:
            tree = ET.parse(xml).getroot()
        except (OSError, ET.ParseError) as err:
            raise InputError(f"{xml}: cannot read the annotation of image {image_id} listed in "
                             f"{list_file} ({err})") from err
        filename = tree.findtext("filename") or f"{image_id}.jpg"
        paths.append(os.path.abspath(base / "JPEGImages" / filename))
        for obj in tree.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in index:
                raise InputError(f"{xml}: unknown class {name!r}; VOC classes are "
                                 f"{', '.join(VOC_CLASSES)}")
            difficult = (obj.findtext("difficult") or "0").strip() == "1"
            k = index[name]
            if not difficult:
                labels[i, k] = POSITIVE
            elif labels[i, k] == NEGATIVE:
                labels[i, k] = DIFFICULT
    return MultiLabelSet(paths, ids, labels)
