"""Turning command-line inputs (folders, single images, file lists) into an ordered image list."""

from __future__ import annotations

import csv
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .remote import is_url

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib",
                              ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm", ".pnm"})
LIST_EXTENSIONS = frozenset({".txt", ".csv", ".lst"})


@dataclass
class ImageList:
    """Image paths in a fixed order, with integer labels and class names when the input has them."""

    paths: list[str]
    labels: list[int] | None = None
    class_names: list[str] | None = None
    sources: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) not used

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """SHA-256 of the ordered paths and labels: two runs on the same input agree on it."""
        digest = hashlib.sha256()
        for i, path in enumerate(self.paths):
            label = self.labels[i] if self.labels is not None else ""
            digest.update(f"{path}\t{label}\n".encode())
        return digest.hexdigest()


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def gather_images(inputs: list[str | os.PathLike]) -> ImageList:
    """Collect images from folders (recursively), single image files and file lists.

    * A folder whose images all sit in sub-folders is a classification dataset: the first-level
      sub-folder names are the classes (sorted, as torchvision's ``ImageFolder``).
    * A ``.txt``/``.lst`` file lists one path per line; a ``.csv`` file has a ``path`` column and
      optionally a ``label`` column (class names, sorted; numerically when all of a list's labels
      are integers, so 2, 10, 1 give classes 1, 2, 10).  Relative paths are relative to the
      list file.
    * Paths are made absolute; folder contents are sorted, so the order is deterministic.
    """
    if not inputs:
        raise InputError("no input given: pass image folders, image files or a file list")
    entries: list[tuple[str, str | None]] = []
    skipped: list[tuple[str, str]] = []
    from_folder = False  # folder classes sort as text, as torchvision's ImageFolder
    for item in inputs:
        path = Path(item)
        if is_url(str(item)):  # an image anywhere fsspec reaches (read by vggfeat.data.urls)
            entries.append((str(item), None))
        elif path.is_dir():
            entries.extend(_scan_folder(path, skipped))
            from_folder = True
        elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
            entries.extend(_read_list(path))
        elif path.is_file():
            entries.append((os.path.abspath(path), None))
        else:
            raise InputError(f"input {item} does not exist; pass image folders, image files or "
                             "a .txt/.csv list of paths")
    unusable = [(p, _unstorable(p)) for p, _ in entries]
    skipped += [(printable(p).replace("\0", "\\x00"), why) for p, why in unusable if why]
    entries = [entry for entry, (_, why) in zip(entries, unusable) if not why]
    if not entries:
        also = f"; skipped {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise InputError(f"no image files found in {', '.join(map(str, inputs))} (looked for "
                         f"{', '.join(sorted(IMAGE_EXTENSIONS))}){also}")
    seen: set[str] = set()
    duplicates = [p for p, _ in entries if p in seen or seen.add(p)]
    if duplicates:
        raise InputError(f"{len(duplicates)} image(s) are listed twice, e.g. {duplicates[0]}; "
                         "each image may appear once")
    paths = [p for p, _ in entries]
    names = [c for _, c in entries]
    if all(c is not None for c in names):
        numeric = not from_folder and all(_is_integer(c) for c in names)
        class_names = sorted(set(names), key=lambda c: (int(c), c) if numeric else c)
        index = {c: i for i, c in enumerate(class_names)}
        return ImageList(paths, [index[c] for c in names], class_names, [str(i) for i in inputs],
                         skipped)
    return ImageList(paths, sources=[str(i) for i in inputs], skipped=skipped)


NOT_UTF8 = ("the file name is not valid UTF-8, so it cannot be stored; rename it (e.g. with "
            "convmv) to include it")


def _is_integer(label: str) -> bool:
    try:
        int(label)
    except ValueError:
        return False
    return True


NUL_IN_PATH = ("the path holds a NUL character, which no file name can: fix that line of "
               "the list")


def _unstorable(path: str) -> str | None:
    """Why ``path`` cannot be read or stored (None: it can)."""
    if "\0" in path:
        return NUL_IN_PATH
    return None if _utf8(path) else NOT_UTF8


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(path: str) -> str:
    """A path whose name has undecodable bytes, with those bytes shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _scan_folder(root: Path, skipped: list[tuple[str, str]]) -> list[tuple[str, str | None]]:
    """Image files under ``root``; symbolic links are followed, but each real folder is scanned
    once, so a link back up the tree (a loop) or a second link to a folder adds nothing."""
    root = Path(os.path.abspath(root))  # skipped links are recorded, and matched, like images
    files, seen = [], {}
    for dirpath, dirnames, names in os.walk(root, followlinks=True):
        dirnames.sort()  # which of two links to one folder is followed must not vary
        st = os.stat(dirpath)
        first = seen.setdefault((st.st_dev, st.st_ino), dirpath)
        if first != dirpath:
            dirnames.clear()
            skipped.append((printable(dirpath), f"a symbolic link to {printable(first)}, which "
                            "is already scanned (a loop or a second link): not followed"))
            continue
        files += [Path(dirpath) / name for name in names if is_image_file(name)]
    files.sort(key=lambda p: p.relative_to(root).parts)
    loose = [f for f in files if len(f.relative_to(root).parts) == 1]
    labelled = bool(files) and not loose
    if loose and len(loose) < len(files):
        warnings.warn(f"{printable(str(root))}: {len(loose)} image(s) lie directly in the folder "
                      f"(e.g. {printable(loose[0].name)}) beside class sub-folders, so none of its "
                      "images gets a class label; move them into a class folder (or remove them) "
                      "to keep the labels", UserWarning, stacklevel=3)
    return [(str(f), f.relative_to(root).parts[0] if labelled else None) for f in files]


def _read_list(list_file: Path) -> list[tuple[str, str | None]]:
    # utf-8-sig: spreadsheet programs save "CSV UTF-8" with a byte-order mark before the header.
    with open(list_file, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        if list_file.suffix.lower() == ".csv":
            return _read_csv(list_file, f)
        return [(_entry_path(list_file, line.strip()), None) for line in f
                if line.strip() and not line.lstrip().startswith("#")]


def _entry_path(list_file: Path, entry: str) -> str:
    """A list's entry: a URL as it is, a path relative to the list file made absolute."""
    return entry if is_url(entry) else os.path.abspath(list_file.parent / entry)


def _read_csv(list_file: Path, f) -> list[tuple[str, str | None]]:
    """(path, label) rows of a CSV list (a ``path`` or ``url`` column); labels only when every
    row has one (else a warning)."""
    reader = csv.DictReader(f)
    names = reader.fieldnames or []
    column = "path" if "path" in names else "url" if "url" in names else None
    if column is None:
        raise InputError(f"{list_file}: a CSV list needs a 'path' (or 'url') column, and "
                         f"optionally 'label'; its header is {reader.fieldnames}")
    entries, unlabelled = [], []
    for row in reader:
        if not (row[column] or "").strip():
            raise InputError(f"{list_file} line {reader.line_num} has no {column}; fill it in "
                             "or remove the row")
        entries.append((_entry_path(list_file, row[column].strip()), row.get("label") or None))
        if entries[-1][1] is None:
            unlabelled.append((reader.line_num, row[column]))
    if "label" in reader.fieldnames and unlabelled:
        line, path = unlabelled[0]
        warnings.warn(f"{list_file} line {line} ({printable(path)}) has no label "
                      f"({len(unlabelled)} of its {len(entries)} rows have none), so none of its "
                      "images gets a label; fill in the labels (or drop the label column) to "
                      "keep them", UserWarning, stacklevel=4)
        return [(p, None) for p, _ in entries]
    return entries
