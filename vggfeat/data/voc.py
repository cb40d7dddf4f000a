"""PASCAL VOC 2007/2012 classification sets and VOC 2012 action sets, read from the devkit's files.

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

# The ten actions VOC 2012 scores ("other" is annotated but not scored).
VOC_ACTIONS = ("jumping", "phoning", "playinginstrument", "reading", "ridingbike", "ridinghorse",
               "running", "takingphoto", "usingcomputer", "walking")

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


def voc_root(root: str | os.PathLike, year: str, task: str = "Main") -> Path:
    """``VOC{year}`` itself, or the ``VOCdevkit`` folder holding it, or the folder above that."""
    root = Path(root)
    for candidate in (root, root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"):
        if (candidate / "ImageSets" / task).is_dir() and (candidate / "Annotations").is_dir():
            return candidate
    raise InputError(f"{root} is not a VOC{year} folder: expected ImageSets/{task}/ and "
                     f"Annotations/ in it, in {root}/VOC{year}/ or in {root}/VOCdevkit/VOC{year}/ "
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
    ids = _listed_ids(list_file)
    labels = np.full((len(ids), len(VOC_CLASSES)), NEGATIVE, dtype=np.int8)
    index = {c: k for k, c in enumerate(VOC_CLASSES)}
    paths = []
    for i, image_id in enumerate(ids):
        xml, tree, path = _annotation(base, image_id, list_file)
        paths.append(path)
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


@dataclass
class PersonActions:
    """The people of VOC 2012's action task, one row per annotated person.

    ``paths``: the image each person is in; ``ids``: ``IMAGEID_K``, K the person's 1-based
    position among the image's objects (the devkit's object index); ``boxes``: N×4 pixel boxes
    (x0, y0, x1, y1), 0-based, end exclusive; ``labels``: N×A int8, 1 doing the action, -1 not.
    """

    paths: list[str]
    ids: list[str]
    boxes: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...] = VOC_ACTIONS

    def __len__(self) -> int:
        return len(self.paths)


def read_voc_actions(root: str | os.PathLike, image_set: str) -> PersonActions:
    """The people of ``ImageSets/Action/{image_set}.txt`` with their boxes and actions, from the
    ``<actions>`` of each person object in the XML annotations."""
    base = voc_root(root, "2012", "Action")
    list_file = base / "ImageSets" / "Action" / f"{image_set}.txt"
    if not list_file.is_file():
        hint = (" The test set's actions are not public: it is scored by the evaluation server"
                if image_set == "test" else "")
        raise InputError(f"{list_file} does not exist; the {image_set} set of the VOC2012 action "
                         f"task is missing from this copy.{hint}")
    paths, ids, boxes, labels = [], [], [], []
    for image_id in dict.fromkeys(_listed_ids(list_file)):  # an image may be listed per person
        xml, tree, path = _annotation(base, image_id, list_file)
        people = 0
        for k, obj in enumerate(tree.iter("object"), start=1):
            actions = obj.find("actions")
            if actions is None:
                continue
            people += 1
            paths.append(path)
            ids.append(f"{image_id}_{k}")
            boxes.append(_pixel_box(obj, xml))
            labels.append([1 if (actions.findtext(a) or "0").strip() == "1" else -1
                           for a in VOC_ACTIONS])
        if not people:
            raise InputError(f"{xml}: image {image_id} is listed in {list_file} but no object "
                             "in its annotation has <actions>")
    return PersonActions(paths, ids, np.asarray(boxes, np.int64).reshape(-1, 4),
                         np.asarray(labels, np.int8).reshape(-1, len(VOC_ACTIONS)))


def _listed_ids(list_file: Path) -> list[str]:
    """The image ids of an ImageSets file: the first word of each line."""
    return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]


def _annotation(base: Path, image_id: str, list_file: Path) -> tuple[Path, ET.Element, str]:
    """(XML path, its root element, the absolute image path) of a listed image."""
    xml = base / "Annotations" / f"{image_id}.xml"
    try:
        tree = ET.parse(xml).getroot()
    except (OSError, ET.ParseError) as err:
        raise InputError(f"{xml}: cannot read the annotation of image {image_id} listed in "
                         f"{list_file} ({err})") from err
    filename = tree.findtext("filename") or f"{image_id}.jpg"
    return xml, tree, os.path.abspath(base / "JPEGImages" / filename)


def _pixel_box(obj: ET.Element, xml: Path) -> list[int]:
    """VOC's 1-based inclusive (xmin, ymin, xmax, ymax) as 0-based, end-exclusive pixels."""
    try:
        x0, y0, x1, y1 = (int(round(float(obj.findtext(f"bndbox/{k}"))))
                          for k in ("xmin", "ymin", "xmax", "ymax"))
    except (TypeError, ValueError) as err:
        raise InputError(f"{xml}: a person's <bndbox> lacks a number ({err})") from err
    if not (x1 >= x0 and y1 >= y0):
        raise InputError(f"{xml}: empty person box ({x0}, {y0}, {x1}, {y1})")
    return [x0 - 1, y0 - 1, x1, y1]


def write_person_crops(people: PersonActions, folder: str | os.PathLike, *,
                       progress: bool = True) -> list[str]:
    """Each person's box cut out of its image as ``folder/IMAGEID_K.png`` (lossless), so the
    descriptor of the box is extracted, cached and resumed like any image's.

    Crops already there are kept: a killed run goes on where it stopped.  Returns the paths.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from ..fileio import atomic_path

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"cannot create the person-crop folder {folder} ({err}); choose another "
                         "with --crops DIR") from err
    out = [os.path.abspath(folder / f"{person_id}.png") for person_id in people.ids]
    todo = [i for i, path in enumerate(out) if not os.path.exists(path)]
    for i in tqdm(todo, unit="img", desc="person crops", disable=not progress or not todo):
        with Image.open(people.paths[i]) as image:
            x0, y0, x1, y1 = people.boxes[i].tolist()
            crop = image.convert("RGB").crop((max(x0, 0), max(y0, 0), min(x1, image.width),
                                              min(y1, image.height)))
        with atomic_path(out[i]) as tmp:
            crop.save(tmp, format="PNG")
    return out
