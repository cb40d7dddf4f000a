"""``vggfeat localize evaluate``: localisation error over a folder of images with known boxes."""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import draw_bounding_boxes

from ..data.boxes import BoxTable, ImageBoxes, inside_image, write_loc_csv
from ..data.imagenet import imagenet_classes
from ..data.images import read_image, to_pil
from ..data.loader import image_loader
from ..data.sources import gather_images
from ..devices import default_workers
from ..errors import InputError
from ..fileio import atomic_path, write_json_atomic, write_text_atomic
from ..progress import image_bar
from .metric import gt_class_errors, score_guesses
from .predict import Guess, Localizer


@dataclass
class LocImages:
    """Images with ground-truth boxes; ``without_boxes`` counts the images left out."""

    paths: list[str]
    truths: list[ImageBoxes]
    without_boxes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def images_with_boxes(folder: str | os.PathLike, boxes: BoxTable) -> LocImages:
    """The images of ``folder`` (flat, or in class folders) that ``boxes`` describes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} does not exist: --data must hold val/ (flat, or one "
                         "sub-folder per class), as for `vggfeat train`")
    found = gather_images([folder])
    paths, truths, missing = [], [], []
    for path in found.paths:
        truth = boxes.get(path)
        if truth is None or not len(truth.wnids):
            missing.append(path)
        else:
            paths.append(path)
            truths.append(truth)
    if not paths:
        raise InputError(f"none of the {len(found)} images in {folder} has a box: "
                         f"{boxes.no_match(found.paths)}")
    return LocImages(paths, truths, missing)


@dataclass
class LocResult:
    method: str
    scales: tuple[int, ...]  # every localisation net's scales together
    paths: list[str]
    guesses: list[list[Guess]]  # per image, best first (center-crop: the ground-truth class's)
    metrics: dict
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)  # Localizer.settings(): each net's scales …
    images_per_forward: float = 0.0  # mean images per forward pass of any net, flips not counted
    other_classes: list[str] = field(default_factory=list)  # images of classes no net boxes

    def summary(self) -> dict:
        nets = {k: self.settings[k] for k in ("scales", "classifiers") if k in self.settings}
        return {**{k: round(v, 3) for k, v in self.metrics.items()}, "images": len(self.paths),
                "failed": len(self.failed), "other_classes": len(self.other_classes),
                "method": self.method, "scales": list(self.scales),
                **({"net_scales": nets["scales"]} if "scales" in nets else {}),
                **({"classifiers": nets["classifiers"]} if nets.get("classifiers") else {}),
                "seconds": round(self.seconds, 1),
                "images_per_forward": round(self.images_per_forward, 2)}


def evaluate_localization(localizer: Localizer, images: LocImages, *, batch_size: int = 8,
                          workers: int | None = None, progress: bool = True,
                          journal: str | os.PathLike | None = None) -> LocResult:
    """Run ``localizer`` on every image and score it (the metric of :mod:`.metric`).

    Args:
        workers: image-decoding processes (default: half the cores, at most 8).
        journal: a JSON-lines file that keeps each finished image's guesses as the run goes.
            A run killed and started again with the same journal (and settings) runs only the
            images it lacks.

    Images of classes that no localisation net boxes are not scored; the result lists them
    (``other_classes``).
    """
    start = time.monotonic()
    workers = default_workers() if workers is None else workers
    images, other_classes = _of_boxed_classes(localizer, images)
    done = _read_journal(journal, localizer) if journal is not None else {}
    found: dict[int, list[Guess]] = {i: done[p] for i, p in enumerate(images.paths) if p in done}
    todo = np.array([i for i, p in enumerate(images.paths) if p not in done], dtype=np.int64)
    loader = _scorable(image_loader(images.paths, todo, localizer.prepare, batch_size=batch_size,
                                    workers=workers,
                                    pin_memory=localizer.locs[0].device.type == "cuda"),
                       images, localizer)
    failed = []
    with image_bar(len(images), initial=len(found), disable=not progress,
                   desc=f"localize {localizer.method}") as bar, \
            (open(journal, "a", encoding="utf-8") if journal is not None else nullcontext()) as log:
        for guessed, unusable in _guessed_batches(localizer, images, loader, bar):
            failed += unusable
            found.update(guessed)
            if log is not None and guessed:
                _append_to_journal(log, {images.paths[i]: g for i, g in guessed.items()})
    kept = sorted(found)
    if not kept:
        raise InputError("no image could be read; see the reasons above")
    guesses = [found[i] for i in kept]
    metrics = _metrics(localizer.method, guesses, [images.truths[i] for i in kept])
    return LocResult(localizer.method, localizer.scales, [images.paths[i] for i in kept], guesses,
                     metrics, failed, time.monotonic() - start, localizer.settings(),
                     localizer.images_per_forward, other_classes)


def _of_boxed_classes(localizer: Localizer, images: LocImages) -> tuple[LocImages, list[str]]:
    """The images with a class that some localisation net boxes (and, for ``dense``, the
    classifier ranks), and the paths of the others, which are not scored: a PCR net trained on
    some classes cannot localise the rest."""
    boxed = {n for n, ok in zip(localizer.class_names, localizer.localizable) if ok}
    keep = [any(w in boxed for w in t.wnids) for t in images.truths]
    other = [p for p, k in zip(images.paths, keep) if not k]
    if len(other) == len(images):
        raise InputError(f"none of the {len(images)} images is of a class the localisation "
                         f"net(s) box ({len(boxed)} classes, e.g. {sorted(boxed)[0]}); "
                         f"{other[0]} is of {images.truths[0].wnids[0]}")
    if not other:
        return images, []
    return LocImages([p for p, k in zip(images.paths, keep) if k],
                     [t for t, k in zip(images.truths, keep) if k], images.without_boxes), other


def _scorable(loader, images: LocImages, localizer: Localizer):
    """The loader's batches, an image whose true box lies outside it turned into a failure
    (its reason in place of its views): the CSV files do not record image sizes, so this is
    only known once the image is read."""
    for batch in loader:
        checked = []
        for i, item, reason in batch:
            if item is not None:
                reason = _outside(images.paths[i], images.truths[i], localizer.unpack(item)[1])
            checked.append((i, None, reason) if reason else (i, item, None))
        yield checked


def _guessed_batches(localizer: Localizer, images: LocImages, loader, bar):
    """After each loader batch: the guesses of the images finished since, by image index, and
    the (path, reason) of the images that cannot be scored.  Moves the bar."""
    if localizer.method == "dense":  # same-shape views of consecutive images share passes
        stream = localizer.stream(on_progress=bar.update)
        for done, unread in stream.run_loader(loader, unpack=localizer.stream_entry,
                                              out_of_order=True):
            yield ({key[0]: localizer.dense_guesses(results, *key[1:]) for key, results in done},
                   [(images.paths[i], reason) for i, _, reason in unread])
        return
    for batch in loader:  # every centre crop has the same shape: a loader batch is a pass
        good = [(i, localizer.unpack(item)) for i, item, reason in batch if reason is None]
        bar.update(len(batch) - len(good))
        yield (_center_crop_guesses(localizer, images, good, bar),
               [(images.paths[i], reason) for i, _, reason in batch if reason is not None])


def _center_crop_guesses(localizer: Localizer, images: LocImages, good: list, bar
                         ) -> dict[int, list[Guess]]:
    """The guess for the true class of each readable image of a batch, by image index."""
    if not good:
        return {}
    names = localizer.class_names
    index = {name: k for k, name in enumerate(names)}
    # The image's first class the net boxes (an ILSVRC image's boxes are all of one class).
    classes = [next(index[w] for w in images.truths[i].wnids if w in index) for i, _ in good]
    boxes = localizer.center_crop([item[0] for _, item in good], [item[1] for _, item in good],
                                  torch.tensor(classes))
    bar.update(len(good))
    return {i: [Guess(c, names[c], tuple(b.tolist()), 1.0)]
            for (i, _), c, b in zip(good, classes, boxes)}


def _append_to_journal(log, guesses: dict[str, list[Guess]]) -> None:
    """One line per image, on disk before the run goes on (a kill loses no finished image)."""
    log.writelines(json.dumps({"path": path, "guesses": [
        [g.class_index, g.wnid, *g.box, g.score] for g in gs]}) + "\n"
        for path, gs in guesses.items())
    log.flush()
    os.fsync(log.fileno())


def _metrics(method: str, guesses: list[list[Guess]], truths: list[ImageBoxes]) -> dict:
    """Top-1/top-5 localisation error (dense), or the centre-crop error with the true class."""
    if method == "dense":
        table = BoxTable({str(i): t for i, t in enumerate(truths)})
        score = score_guesses({str(i): [(g.wnid, g.box) for g in gs]
                               for i, gs in enumerate(guesses)}, table)
        return {"top1_loc_error": score.top1_loc_error, "top5_loc_error": score.top5_loc_error}
    boxes = np.array([gs[0].box for gs in guesses])
    wrong = gt_class_errors(boxes, [t.of_class(gs[0].wnid) for t, gs in zip(truths, guesses)])
    return {"gt_class_loc_error": 100.0 * float(wrong.mean())}


def _outside(path: str, truth: ImageBoxes, size: tuple[int, int]) -> str | None:
    """Why the ground truth of an image of ``size`` (H, W) cannot be scored, or None; the CSV
    files do not record image sizes, so this is only known once the image is read."""
    try:
        inside_image(truth.xyxy, size[1], size[0], where=path)
    except InputError as err:
        return f"ground-truth {str(err).removeprefix(f'{path}: ')}"
    return None


def _read_journal(journal: str | os.PathLike, localizer: Localizer) -> dict[str, list[Guess]]:
    """The guesses a journal holds, by image path; starts the journal with the run's settings.

    The settings line is published whole (written beside the journal, then renamed), so a kill
    never leaves a journal whose settings cannot be checked.  A journal of other settings is
    refused; so is one whose first line is not a settings line but that holds guesses (they
    could be of any settings).  A journal holding only a cut settings line is started afresh;
    a guess line cut short by a kill is ignored.
    """
    journal = Path(journal)
    settings = localizer.settings()
    if not journal.exists() or journal.stat().st_size == 0 or _only_a_cut_header(journal):
        write_text_atomic(journal, json.dumps({"settings": settings}) + "\n")
        return {}
    with open(journal, "rb+") as f:  # a line cut short must not swallow the next one
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
            f.write(b"\n")
    done: dict[str, list[Guess]] = {}
    with open(journal, encoding="utf-8") as f:
        header = _journal_entry(f.readline())
        if not isinstance(header, dict) or "settings" not in header:
            raise InputError(f"{journal} does not start with the settings of its run, so its "
                             "guesses cannot be checked; delete it to start afresh")
        if header["settings"] != settings:
            raise InputError(f"{journal} holds a run with other settings "
                             f"({header['settings']}); delete it to start afresh")
        for line in f:
            entry = _journal_entry(line)
            if entry is None:
                continue  # the last line of a killed run
            done[entry["path"]] = [Guess(int(c), w, (x0, y0, x1, y1), s)
                                   for c, w, x0, y0, x1, y1, s in entry["guesses"]]
    return done


def _journal_entry(line: str):
    """A journal line's JSON; None for a line cut short."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def _only_a_cut_header(journal: Path) -> bool:
    """True for a journal holding one line, not valid JSON: a settings line whose writing was
    cut (by versions that wrote it in place), with no guess after it."""
    with open(journal, "rb") as f:
        first, rest = f.readline(), f.read().strip()
    return not rest and _journal_entry(first.decode("utf-8", "replace")) is None


def write_predictions(result: LocResult, path: str | os.PathLike) -> Path:
    """The LOC submission CSV: per image, up to 5 ``wnid xmin ymin xmax ymax`` groups."""
    return write_loc_csv(path, {Path(p).stem: [(g.wnid, g.box) for g in gs]
                                for p, gs in zip(result.paths, result.guesses)})


def write_summary(result: LocResult, path: str | os.PathLike, **extra) -> Path:
    write_json_atomic(path, {**result.summary(), **extra})
    return Path(path)


def draw_guesses(image_path: str | os.PathLike, guesses: list[Guess],
                 truth: ImageBoxes | None, output: str | os.PathLike) -> Path:
    """A PNG of the image with the true boxes (green), the best guess (red, thick) and the other
    guesses (orange), labelled by class and rank."""
    image = read_image(image_path)
    width = max(2, min(image.shape[-2:]) // 150)
    wnids, names = imagenet_classes()
    name = dict(zip(wnids, (n.split(",")[0] for n in names)))

    def label(wnid: str) -> str:
        return f"{wnid} {name[wnid]}" if wnid in name else wnid

    if truth is not None and len(truth.wnids):
        image = draw_bounding_boxes(image, torch.as_tensor(truth.xyxy), colors="lime",
                                    width=width, labels=[f"true {label(w)}" for w in truth.wnids])
    if guesses[1:]:
        image = draw_bounding_boxes(image, torch.tensor([g.box for g in guesses[1:]]),
                                    colors="orange", width=max(1, width // 2),
                                    labels=[f"{k + 2}: {label(g.wnid)}"
                                            for k, g in enumerate(guesses[1:])])
    if guesses:
        image = draw_bounding_boxes(image, torch.tensor([guesses[0].box]), colors="red",
                                    width=width, labels=[f"1: {label(guesses[0].wnid)}"])
    output = Path(output)
    with atomic_path(output) as tmp:
        to_pil(image).save(tmp, format="PNG")
    return output


def draw_all(result: LocResult, images: LocImages, folder: str | os.PathLike) -> int:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    truth = dict(zip(images.paths, images.truths))
    for path, guesses in zip(result.paths, result.guesses):
        draw_guesses(path, guesses, truth.get(path), folder / f"{Path(path).stem}.png")
    return len(result.paths)
