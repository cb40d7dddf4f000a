"""ILSVRC CLS-LOC bounding boxes, in either layout they are distributed in.

* Pascal-VOC XML, one file per image, as in the ILSVRC2012 bbox archives: ``<wnid>/<image>.xml``
  for training images, ``<image>.xml`` for validation images (any folder depth is read).
* ``LOC_train_solution.csv`` / ``LOC_val_solution.csv``: ``ImageId,PredictionString`` rows, where
  ImageId is the image file name without its extension and PredictionString holds
  ``wnid xmin ymin xmax ymax`` groups.  A LOC submission file has the same shape, so the same
  reader loads predictions for scoring.

Boxes are kept as the files give them, in pixels of the original image, corners (xmin, ymin,
xmax, ymax); areas and overlaps treat them as continuous rectangles (width = xmax − xmin).
Images are matched to their boxes by file name without extension (an XML file's own name, not
its ``<filename>`` tag).  Bad boxes (zero or negative
area, outside the image the XML describes) are dropped and reported with the file they came from.
"""

from __future__ import annotations

import csv
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..fileio import atomic_write

# A box may overhang the image by this many pixels (annotation tools round) before it is bad.
EDGE_TOLERANCE = 1.0


@dataclass
class ImageBoxes:
    """The boxes of one image: ``wnids[i]`` is the class of ``xyxy[i]`` (M×4 float32, pixels)."""

    wnids: list[str]
    xyxy: np.ndarray
    size: tuple[int, int] | None = None  # (width, height) when the annotation records it

    def of_class(self, wnid: str) -> np.ndarray:
        """The boxes of one class, K×4."""
        return self.xyxy[[w == wnid for w in self.wnids]]


@dataclass
class BoxTable:
    """Boxes keyed by image name (file name without extension), and the boxes dropped as bad."""

    boxes: dict[str, ImageBoxes]
    bad: list[tuple[str, str]] = field(default_factory=list)  # (annotation file, reason)
    source: str = ""

    def __len__(self) -> int:
        return len(self.boxes)

    def get(self, image_path: str | os.PathLike) -> ImageBoxes | None:
        return self.boxes.get(Path(image_path).stem)

    def no_match(self, image_paths: list[str]) -> str:
        """Why none of ``image_paths`` has boxes here, with a name of each side to compare."""
        count = sum(len(b.wnids) for b in self.boxes.values())
        if not count:
            return f"{self.source} holds no usable box"
        example = f", e.g. {next(iter(self.boxes))} vs {Path(image_paths[0]).stem}" \
            if image_paths else ""
        return (f"{count} boxes read from {self.source}, none matches an image name{example} "
                "(images are matched by file name without extension)")


def read_boxes(path: str | os.PathLike, *, ordered: bool = False) -> BoxTable:
    """Read an XML folder (or one XML file) or a ``LOC_*_solution.csv`` file.

    With ``ordered=True`` (submission files) the groups keep their order and may repeat a class;
    the boxes of a row are then the ranked guesses.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.xml"))
        if not files:
            raise InputError(f"{path} holds no .xml box files; --boxes takes the folder of "
                             "ILSVRC bbox XML files or a LOC_*_solution.csv file")
        table = BoxTable({}, source=str(path))
        for file in files:
            _read_xml(file, table)
        return table
    if not path.is_file():
        raise InputError(f"box file {path} does not exist; --boxes takes the folder of ILSVRC "
                         "bbox XML files or a LOC_*_solution.csv file")
    if path.suffix.lower() == ".xml":
        table = BoxTable({}, source=str(path))
        _read_xml(path, table)
        return table
    return _read_csv(path, ordered=ordered)


def _read_xml(file: Path, table: BoxTable) -> None:
    try:
        root = ET.parse(file).getroot()
    except (OSError, ET.ParseError) as err:
        raise InputError(f"{file}: not a readable Pascal-VOC XML box file ({err})") from err
    size = _image_size(root, file)
    # The image is the XML file's own name (ILSVRC: <wnid>/<image>.xml); the <filename> tag is
    # often wrong in the archives (a folder's name, another image's).
    wnids, boxes = [], []
    for k, obj in enumerate(root.iter("object")):
        wnid = (obj.findtext("name") or "").strip()
        try:
            box = [float(obj.findtext(f"bndbox/{c}")) for c in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            table.bad.append((str(file), f"object {k + 1} ({wnid}) has no numeric bndbox"))
            continue
        reason = _check(box, size)
        if reason:
            table.bad.append((str(file), f"object {k + 1} ({wnid}): {reason}"))
            continue
        wnids.append(wnid)
        boxes.append(box)
    _add(table, file.stem, wnids, boxes, size)


def _image_size(root: ET.Element, file: Path) -> tuple[int, int] | None:
    """The (width, height) an XML file records, None when it records none."""
    fields = {}
    for field_name in ("width", "height"):
        text = (root.findtext(f"size/{field_name}") or "").strip()
        try:
            fields[field_name] = int(float(text)) if text else None
        except (ValueError, OverflowError):  # also "nan" and "inf", which int() refuses
            raise InputError(f"{file}: <size><{field_name}> is {text!r}, not a whole number of "
                             "pixels; fix the file or move it out of the box folder") from None
    if fields["width"] is None or fields["height"] is None:
        return None
    return fields["width"], fields["height"]


def _read_csv(path: Path, *, ordered: bool) -> BoxTable:
    table = BoxTable({}, source=str(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            _read_csv_rows(path, csv.reader(f), table, ordered=ordered)
    except UnicodeDecodeError as err:
        raise InputError(f"{path} is not a text CSV file ({err.reason} at byte {err.start}); "
                         "--boxes takes LOC_*_solution.csv or a folder of XML files") from None
    return table


def _read_csv_rows(path: Path, rows, table: BoxTable, *, ordered: bool) -> None:
    header = next(rows, None)
    if not header or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
        raise InputError(f"{path}: expected the header 'ImageId,PredictionString' of "
                         f"LOC_*_solution.csv (or a LOC submission), got {header}")
    first_line: dict[str, int] = {}  # a submission's image → its row's line
    for line, row in enumerate(rows, start=2):
        if not row or not row[0].strip():
            continue
        where = f"{path}:{line}"
        image = Path(row[0].strip()).stem if "." in row[0] else row[0].strip()
        if ordered and image in first_line:  # two rankings of one image: which one counts?
            raise InputError(f"{where}: {row[0].strip()} already has a row (line "
                             f"{first_line[image]}); a submission gives each image one row")
        first_line.setdefault(image, line)
        parts = row[1].split() if len(row) > 1 else []
        if len(parts) % 5:
            raise InputError(f"{where}: the prediction string of {row[0]} must hold "
                             f"'wnid xmin ymin xmax ymax' groups; it has {len(parts)} fields")
        wnids, boxes = [], []
        for g in range(0, len(parts), 5):
            wnid = parts[g]
            try:
                box = [float(v) for v in parts[g + 1:g + 5]]
            except ValueError:
                raise InputError(f"{where}: box {g // 5 + 1} of {row[0]} is not numeric: "
                                 f"{' '.join(parts[g:g + 5])}") from None
            reason = _check(box, None)
            if ordered and not all(np.isfinite(box)):
                raise InputError(f"{where}: box {g // 5 + 1} of {row[0]} has non-finite "
                                 f"coordinates: {' '.join(parts[g:g + 5])}")
            if reason and not ordered:
                table.bad.append((where, f"{row[0]} box {g // 5 + 1} ({wnid}): {reason}"))
                continue
            wnids.append(wnid)
            boxes.append(box)
        _add(table, image, wnids, boxes, None)


def _check(box: list[float], size: tuple[int, int] | None) -> str | None:
    x0, y0, x1, y1 = box
    if not all(np.isfinite(box)):
        return "non-finite coordinates"
    if x1 <= x0 or y1 <= y0:
        return f"zero or negative area ({x0:g}, {y0:g}, {x1:g}, {y1:g})"
    if size is not None:
        w, h = size
        t = EDGE_TOLERANCE
        if x0 < -t or y0 < -t or x1 > w + t or y1 > h + t:
            return f"outside the {w}×{h} image ({x0:g}, {y0:g}, {x1:g}, {y1:g})"
    return None


def _add(table: BoxTable, image: str, wnids: list[str], boxes: list[list[float]],
         size: tuple[int, int] | None) -> None:
    old = table.boxes.get(image)
    xyxy = np.asarray(boxes, np.float32).reshape(-1, 4)
    if old is not None:  # an image described in two files: keep every box
        wnids, xyxy = old.wnids + wnids, np.concatenate([old.xyxy, xyxy])
    table.boxes[image] = ImageBoxes(list(wnids), xyxy, size or (old.size if old else None))


def inside_image(xyxy: np.ndarray, width: int, height: int, *, where: str = "") -> np.ndarray:
    """Boxes clipped to a W×H image (annotations may overhang by :data:`EDGE_TOLERANCE`); a box
    further outside raises :class:`InputError` naming ``where``."""
    t = EDGE_TOLERANCE
    outside = (xyxy[:, 0] < -t) | (xyxy[:, 1] < -t) | (xyxy[:, 2] > width + t) | \
        (xyxy[:, 3] > height + t)
    if outside.any():
        box = ", ".join(f"{v:g}" for v in xyxy[outside][0])
        raise InputError(f"{where}: box ({box}) is outside the {width}×{height} image; fix or "
                         "drop it in the box file")
    return np.stack([xyxy[:, 0].clip(0, width), xyxy[:, 1].clip(0, height),
                     xyxy[:, 2].clip(0, width), xyxy[:, 3].clip(0, height)], axis=1)


def write_loc_csv(path: str | os.PathLike, rows: dict[str, list[tuple[str, object]]]) -> Path:
    """Write ``ImageId,PredictionString`` rows (the LOC submission format): per image, its
    (wnid, box) guesses as ``wnid xmin ymin xmax ymax`` groups, in whole pixels."""
    path = Path(path)
    with atomic_write(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for name, guesses in rows.items():
            groups = [f"{wnid} " + " ".join(str(int(round(float(v)))) for v in box)
                      for wnid, box in guesses]
            writer.writerow([name, " ".join(groups)])
    return path
