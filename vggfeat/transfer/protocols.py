"""The paper's transfer protocols (Appendix B, Tables 11 and 12) on cached descriptors.

A protocol fixes the images, the splits, how hyper-parameters are chosen and the metric.  The
descriptors come from one or more feature files (several files are stacked: the paper's
"Net-D & Net-E"), matched to the dataset's images by path.  Each file's per-scale descriptors are
averaged or kept stacked, then L2-normalised; a linear classifier is trained on them, with no
fine-tuning of the net.

VOC-2012 action classification (Table 12) scores people, not images: each annotated person is
described by the whole image's descriptor, or by that stacked with the descriptor of the person's
box (cut out and extracted like any image).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from sklearn.metrics import recall_score
from sklearn.preprocessing import normalize

from ..cache.store import load_features
from ..choices import VOC_SCALES
from ..data.folders import caltech_root, class_folders
from ..data.sources import ImageList, InputError
from ..data.voc import (
    VOC_ACTIONS,
    VOC_CLASSES,
    read_voc,
    read_voc_actions,
    voc_root,
    write_person_crops,
)
from ..descriptors.descriptor import DENSE_SCALES, DescriptorSpec
from .classifiers import C_GRIDS, CLASSIFIERS, choose_C, fit_classifier
from .metrics import mean_class_recall, voc_ap
from .splits import fraction_split, holdout, per_class_split
from .transforms import AGGREGATES, ScaleAggregator

HOLDOUT = 0.2  # share of each training split held out to choose C (the paper's 20%)
FOLDER_TRAIN_FRACTION = 0.75
# Table 12's two descriptors of a person: the whole image, or the whole image and the person box.
ACTION_SETTINGS = ("image", "image+box")


# The two ways VOC ranks images: Table 11's VOC-2007 figures are 11-point mAP, VOC-2012's are
# the area under the precision/recall curve.
AP_TITLES = {"11point": "mAP, 11-point (%)", "area": "mAP, area (%)"}
CLASS_RECALL = "mean class recall (%)"


@dataclass(frozen=True)
class FixedSets:
    """A dataset's official image sets, as a protocol uses them.

    Attributes:
        fit: trains the classifiers compared when choosing C.
        val: scores them; the chosen C is then trained on ``fit`` and ``val`` together.  None:
            C is chosen on a held-out 20% of ``fit``, and the classifier trained on all of it.
        test: scored in the result.
    """

    fit: str
    val: str | None
    test: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name in (self.fit, self.val, self.test) if name)


@dataclass(frozen=True)
class Protocol:
    """One column of Table 11 (or Table 12's VOC-2012 action), with what sets it apart.

    Attributes:
        title: column heading.
        read: ``read(protocol, root, crops, progress)`` reads the images and labels from the
            dataset's root in its official layout.
        ap: multi-label protocols: the AP scored (a key of ``AP_TITLES``); None for a
            multi-class protocol scored by mean class recall.
        sets: multi-label protocols: the official sets that train, choose C and score.
        person_boxes: samples are annotated people, described with or without their box.
        train_per_class, test_per_class: Caltech-style per-class split sizes (None: all the rest).
        splits: number of seeded random splits (1 for VOC's fixed sets).
        paper: Table 11's (mean, std) per net, in %.
        aggregate: how the paper combined scales for this dataset (used when the file allows).
        scales: the paper's test scales Q (px) for this dataset's descriptors.
    """

    name: str
    title: str
    read: Callable[[Protocol, Path, str | os.PathLike | None, bool], Dataset] = field(
        repr=False, compare=False)
    ap: str | None = None
    sets: FixedSets | None = None
    person_boxes: bool = False
    train_per_class: int | None = None
    test_per_class: int | None = None
    splits: int = 1
    paper: dict[str, tuple[float, float | None]] = field(default_factory=dict)
    aggregate: str | None = None
    scales: tuple[int, ...] = DENSE_SCALES
    note: str = ""

    @property
    def multilabel(self) -> bool:
        return self.ap is not None

    @property
    def metric(self) -> str:
        """What the numbers are (percent)."""
        return AP_TITLES[self.ap] if self.ap else CLASS_RECALL


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name``; an error listing the valid names otherwise."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise InputError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {name!r}") from None


@dataclass
class Dataset:
    """Images and labels of a protocol: N labels (multi-class) or N×K in {1, 0, -1} (VOC);
    ``sets`` are VOC's named image sets as index arrays."""

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    sets: dict[str, np.ndarray] = field(default_factory=dict)
    boxes: list[str] | None = None  # VOC actions: each person's box as an image file

    def subset(self, keep: np.ndarray) -> Dataset:
        new_index = np.cumsum(keep) - 1
        sets = {name: new_index[idx[keep[idx]]] for name, idx in self.sets.items()}
        boxes = None if self.boxes is None else [b for b, k in zip(self.boxes, keep) if k]
        return Dataset([p for p, k in zip(self.paths, keep) if k], self.labels[keep],
                       self.class_names, sets, boxes)


@dataclass
class TransferResult:
    """Scores in percent; ``per_class`` holds each class's score averaged over splits."""

    protocol: str
    classifier: str
    aggregate: str
    features: list[str]
    metric: str
    scores: list[float]
    per_class: dict[str, float]
    extra: dict[str, float] = field(default_factory=dict)
    chosen_C: list = field(default_factory=list)  # per split (multi-class) or per class (VOC)
    C_grid: tuple[float, ...] = ()  # the values C was chosen from
    sizes: dict[str, int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    splits: list[dict[str, list[str]]] = field(default_factory=list)
    setting: str = ""  # VOC actions: "image" or "image+box"

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def std(self) -> float:
        return float(np.std(self.scores)) if len(self.scores) > 1 else 0.0


def load_dataset(protocol: str, root: str | os.PathLike, *,
                 crops: str | os.PathLike | None = None, progress: bool = True) -> Dataset:
    """The protocol's images and labels from a dataset root in its official layout.

    For ``voc2012-action`` the people's boxes are cut out into ``crops`` (default
    ``VOC2012/PersonCrops/``) the first time, so their descriptors can be extracted.
    """
    spec = get_protocol(protocol)
    return spec.read(spec, Path(root).expanduser(), crops, progress)


def _read_voc(year: str, spec: Protocol, root: Path, crops, progress: bool) -> Dataset:
    names = spec.sets.names
    parts = {name: read_voc(root, year, name) for name in names}
    paths, labels, sets = [], [], {}
    for name, part in parts.items():
        sets[name] = np.arange(len(paths), len(paths) + len(part))
        paths += part.paths
        labels.append(part.labels)
    if len(set(paths)) != len(paths):
        raise InputError(f"{root}: an image is listed in two of the sets {names}")
    return Dataset(paths, np.concatenate(labels), list(VOC_CLASSES), sets)


def _read_voc_actions(spec: Protocol, root: Path, crops: str | os.PathLike | None,
                      progress: bool) -> Dataset:
    parts = {name: read_voc_actions(root, name) for name in spec.sets.names}
    folder = crops or voc_root(root, "2012", "Action") / "PersonCrops"
    paths, labels, sets, boxes = [], [], {}, []
    for name, part in parts.items():
        sets[name] = np.arange(len(paths), len(paths) + len(part))
        paths += part.paths
        labels.append(part.labels)
        boxes += write_person_crops(part, folder, progress=progress)
    if len(set(boxes)) != len(boxes):
        raise InputError(f"{root}: a person is listed in both the train and val action sets")
    return Dataset(paths, np.concatenate(labels), list(VOC_ACTIONS), sets, boxes)


def _read_caltech(spec: Protocol, root: Path, crops, progress: bool) -> Dataset:
    return _from_image_list(class_folders(caltech_root(root, spec.name)))


def _read_folders(spec: Protocol, root: Path, crops, progress: bool) -> Dataset:
    return _from_image_list(class_folders(root))


def _from_image_list(images: ImageList) -> Dataset:
    return Dataset(images.paths, np.asarray(images.labels), list(images.class_names))


# VOC-2007: the official train/val choose C, trainval trains, test scores.  VOC-2012's test
# labels are not public: val is the test set, and C is chosen on 20% of train.
VOC2007_SETS = FixedSets(fit="train", val="val", test="test")
VOC2012_SETS = FixedSets(fit="train", val=None, test="val")

PROTOCOLS = {p.name: p for p in (
    Protocol("voc2007", "VOC-2007", partial(_read_voc, "2007"), ap="11point",
             sets=VOC2007_SETS,
             paper={"Net-D": (89.3, None), "Net-E": (89.3, None), "Net-D & Net-E": (89.7, None)},
             aggregate="mean", scales=VOC_SCALES,
             note="train on trainval, test on test; C per class chosen on val after training "
                  "on train"),
    Protocol("voc2012", "VOC-2012", partial(_read_voc, "2012"), ap="area", sets=VOC2012_SETS,
             paper={"Net-D": (89.0, None), "Net-E": (89.0, None), "Net-D & Net-E": (89.3, None)},
             aggregate="mean", scales=VOC_SCALES,
             note="the paper's figures are on the test set, scored by the VOC evaluation server; "
                  "here: train on train, score val, C per class chosen on 20% of train"),
    Protocol("voc2012-action", "VOC-2012 action", _read_voc_actions, ap="area",
             sets=VOC2012_SETS, person_boxes=True,
             paper={"Net-D & Net-E, image": (79.2, None),
                    "Net-D & Net-E, image+box": (84.0, None)},
             aggregate="mean", scales=VOC_SCALES,
             note="one sample per annotated person, AP per action over people; the paper's "
                  "figures (Table 12) are on the test set, scored by the VOC evaluation server; "
                  "here: train on train, score val, C per action chosen on 20% of the train "
                  "images (all people of an image on one side)"),
    Protocol("caltech101", "Caltech-101", _read_caltech, train_per_class=30,
             test_per_class=50, splits=3,
             paper={"Net-D": (91.8, 1.0), "Net-E": (92.3, 0.5), "Net-D & Net-E": (92.7, 0.5)},
             aggregate="stack",
             note="30 training images per class, up to 50 test; 20% of training held out for C"),
    Protocol("caltech256", "Caltech-256", _read_caltech, train_per_class=60, splits=3,
             paper={"Net-D": (85.0, 0.2), "Net-E": (85.1, 0.3), "Net-D & Net-E": (86.2, 0.3)},
             aggregate="stack",
             note="60 training images per class, the rest test; 20% of training held out for C"),
    Protocol("folder", "folder", _read_folders, splits=3,
             note=f"stratified split, {FOLDER_TRAIN_FRACTION:.0%} of each class for training "
                  "unless --train-per-class; 20% of training held out for C"),
)}


def dataset_from_features(path: str | os.PathLike) -> Dataset:
    """A multi-class dataset from the labels a feature file stores (extracted from class folders)."""
    bunch = load_features(path, lazy=True)  # labels and paths only: the features are read later
    bunch.file.close()
    if bunch.target is None:
        raise InputError(f"{path} stores no labels (its images were not in class folders): pass "
                         "--data with the dataset root")
    return Dataset(bunch.paths, np.asarray(bunch.target), list(bunch.target_names))


def descriptors(files: list[str | os.PathLike], dataset: Dataset, *, aggregate: str | None,
                preferred: str | None = None
                ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Stack the files' L2-normalised descriptors of the dataset's images.

    Scales are combined as ``aggregate`` says (an error if a file cannot give it); without it,
    as ``preferred`` says where a file allows, else as stored.

    Returns (X for the kept images, keep mask over ``dataset.paths``, one description and the
    aggregation used per file).
    Images a file could not read are dropped (they are reported); images a file lacks are an
    error.
    """
    blocks, labels, used = [], [], []
    keep = np.ones(len(dataset.paths), bool)
    for file in files:
        bunch = load_features(file)
        row = {p: i for i, p in enumerate(bunch.paths)}
        failed = {p for p, _ in bunch.failed}
        absent = [p for p in dataset.paths if p not in row and p not in failed]
        if absent:
            raise InputError(f"{file} has no descriptor for {len(absent)} of the {len(dataset.paths)}"
                             f" images of the dataset, e.g. {absent[0]}; extract them (pass --data "
                             "with the dataset root and a new FEATURES file)")
        keep &= np.array([p in row for p in dataset.paths])
        rows = np.array([row.get(p, 0) for p in dataset.paths])
        stored = bunch.attrs.get("aggregate", "mean")
        wanted = aggregate or (preferred if stored == "stack" and preferred else stored)
        blocks.append(_aggregated(bunch.data[rows], bunch.attrs, wanted, file))
        labels.append(_describe(bunch.attrs, wanted))
        used.append(wanted)
    return np.hstack(blocks)[keep], keep, labels, used


def _aggregated(X: np.ndarray, attrs: dict, wanted: str, file) -> np.ndarray:
    stored = attrs.get("aggregate", "mean")
    if wanted not in AGGREGATES:
        raise InputError(f"aggregate must be one of {AGGREGATES}, got {wanted!r}")
    if wanted != stored:
        if stored != "stack":
            raise InputError(f"{file} holds scale-averaged descriptors, so they cannot be "
                             "stacked; extract with --aggregate stack to compare mean and stack")
        # Averaging the blocks of a stack is valid whether or not the stack was L2-normalised:
        # normalisation scales every block by the same factor, and the result is normalised again.
        X = ScaleAggregator(len(attrs["scales"]), "mean").fit_transform(X)
    return normalize(X.astype(np.float32, copy=False))


def _describe(attrs: dict, aggregate: str) -> str:
    scales = ",".join(str(q) for q in attrs.get("scales", []))
    return (f"{attrs.get('arch', '?')} ({attrs.get('weights', '?')}) {attrs.get('layer', '?')}, "
            f"Q {scales}, {aggregate}")


def run_protocol(protocol: str, dataset: Dataset, files: list[str | os.PathLike], *,
                 classifier: str = "svm", aggregate: str | None = None, splits: int | None = None,
                 train_per_class: int | None = None, test_per_class: int | None = None,
                 C_grid: tuple[float, ...] | None = None, seed: int = 0,
                 setting: str | None = None) -> TransferResult:
    """Train and score linear classifiers on the descriptors of ``files`` as ``protocol`` says.

    ``setting`` (``voc2012-action`` only): ``"image"`` describes a person by the whole image,
    ``"image+box"`` (the default) by the whole image and the person's box, stacked.
    """
    spec = get_protocol(protocol)
    if classifier not in CLASSIFIERS:
        raise InputError(f"classifier must be one of {CLASSIFIERS}, got {classifier!r}")
    if (setting is not None or dataset.boxes is not None) and not spec.person_boxes:
        raise InputError(f"setting and person boxes belong to voc2012-action, not {protocol}")
    setting = setting or ("image+box" if spec.person_boxes else "")
    if setting and setting not in ACTION_SETTINGS:
        raise InputError(f"setting must be one of {', '.join(ACTION_SETTINGS)}, got {setting!r}")
    X, keep, described, used = descriptors(files, dataset, aggregate=aggregate,
                                           preferred=spec.aggregate)
    if setting == "image+box":
        box_set = Dataset(dataset.boxes, dataset.labels, dataset.class_names)
        X_box, keep_box, _, _ = descriptors(files, box_set, aggregate=aggregate,
                                            preferred=spec.aggregate)
        both = keep & keep_box
        X = np.hstack([X[both[keep]], X_box[both[keep_box]]])
        keep = both
    data = dataset.subset(keep)
    grid = tuple(C_grid or C_GRIDS[classifier])
    if spec.multilabel:
        scored = _run_multilabel(spec, data, X, classifier=classifier, grid=grid, seed=seed)
    else:
        scored = _run_multiclass(data, X, classifier=classifier, grid=grid, seed=seed,
                                 splits=splits or spec.splits,
                                 train_per_class=train_per_class or spec.train_per_class,
                                 test_per_class=test_per_class or spec.test_per_class)
    return TransferResult(
        protocol=spec.name, classifier=classifier, aggregate="+".join(dict.fromkeys(used)),
        features=described, metric=spec.metric, C_grid=grid,
        dropped=[p for p, k in zip(dataset.paths, keep) if not k], setting=setting, **scored)


def _sizes(data: Dataset, train_idx, val_idx, test_idx) -> dict[str, int]:
    return {"classes": len(data.class_names), "train": len(train_idx), "val": len(val_idx),
            "test": len(test_idx)}


def _split_paths(data: Dataset, fit_idx, val_idx, test_idx) -> dict[str, list[str]]:
    return {name: [data.paths[i] for i in idx] for name, idx in
            (("fit", fit_idx), ("val", val_idx), ("test", test_idx))}


def _run_multiclass(data: Dataset, X: np.ndarray, *, classifier: str, grid: tuple[float, ...],
                    seed: int, splits: int, train_per_class: int | None,
                    test_per_class: int | None) -> dict:
    """The scores of ``splits`` seeded splits, as :class:`TransferResult` fields."""
    y = data.labels
    scores, per_class, chosen, split_paths = [], [], [], []
    for s in range(splits):
        if train_per_class:
            train_idx, test_idx = per_class_split(y, n_train=train_per_class,
                                                  n_test=test_per_class, seed=seed + s,
                                                  class_names=data.class_names)
        else:
            train_idx, test_idx = fraction_split(y, train_fraction=FOLDER_TRAIN_FRACTION,
                                                 seed=seed + s)
        fit_idx, val_idx = holdout(train_idx, y, fraction=HOLDOUT, seed=seed + s)
        C, _ = choose_C(classifier, grid, (X[fit_idx], y[fit_idx]), (X[val_idx], y[val_idx]),
                        lambda m, Xv, yv: mean_class_recall(yv, m.predict(Xv)), seed=seed)
        model = fit_classifier(classifier, C, X[train_idx], y[train_idx], seed=seed)
        predicted = model.predict(X[test_idx])
        scores.append(100 * mean_class_recall(y[test_idx], predicted))
        per_class.append(100 * recall_score(y[test_idx], predicted, average=None,
                                            labels=np.arange(len(data.class_names)),
                                            zero_division=0))
        chosen.append(C)
        split_paths.append(_split_paths(data, fit_idx, val_idx, test_idx))
    return dict(
        scores=scores,
        per_class=dict(zip(data.class_names, np.mean(per_class, axis=0).round(2).tolist())),
        extra={"accuracy of the last split (%)": float(100 * np.mean(predicted == y[test_idx]))},
        chosen_C=chosen, sizes=_sizes(data, train_idx, val_idx, test_idx), splits=split_paths)


def _run_multilabel(spec: Protocol, data: Dataset, X: np.ndarray, *, classifier: str,
                    grid: tuple[float, ...], seed: int) -> dict:
    """One classifier per class on the protocol's fixed sets, as :class:`TransferResult` fields."""
    fixed = spec.sets
    if fixed.val:
        fit_idx, val_idx = data.sets[fixed.fit], data.sets[fixed.val]
        train_idx = np.concatenate([fit_idx, val_idx])
    else:
        train_idx = data.sets[fixed.fit]
        # People of one image go to the same side (their image descriptors are identical).
        groups = np.asarray(data.paths) if spec.person_boxes else None
        fit_idx, val_idx = holdout(train_idx, None, fraction=HOLDOUT, seed=seed, groups=groups)
    test_idx = data.sets[fixed.test]
    ap = {metric: {} for metric in AP_TITLES}
    chosen = []
    for k, name in enumerate(data.class_names):
        y = data.labels[:, k]
        # "difficult" images are left out of training, as in VOC (and ignored by voc_ap)
        fit_k, train_k = fit_idx[y[fit_idx] != 0], train_idx[y[train_idx] != 0]
        C, _ = choose_C(classifier, grid, (X[fit_k], y[fit_k]), (X[val_idx], y[val_idx]),
                        lambda m, Xv, yv: voc_ap(yv, m.decision_function(Xv)), seed=seed)
        model = fit_classifier(classifier, C, X[train_k], y[train_k], seed=seed)
        s = model.decision_function(X[test_idx])
        for metric in AP_TITLES:
            ap[metric][name] = 100 * voc_ap(y[test_idx], s, metric=metric)
        chosen.append(C)
    main = ap[spec.ap]
    return dict(
        scores=[float(np.mean(list(main.values())))],
        per_class={k: round(v, 2) for k, v in main.items()},
        extra={AP_TITLES[m]: float(np.mean(list(v.values()))) for m, v in ap.items()
               if m != spec.ap},
        chosen_C=chosen, sizes=_sizes(data, train_idx, val_idx, test_idx),
        splits=[_split_paths(data, fit_idx, val_idx, test_idx)])


def descriptor_spec(protocol: str, *, layer: str = "fc7",
                    scales: tuple[int, ...] | None = None) -> DescriptorSpec:
    """How a protocol's descriptors are extracted: the paper's scales for the dataset (unless
    ``scales`` is given), stored stacked and unnormalised so that one file serves both scale
    aggregations."""
    return DescriptorSpec(layer=layer, scales=tuple(scales or get_protocol(protocol).scales),
                          aggregate="stack", l2=False)


def extraction_inputs(dataset: Dataset) -> ImageList:
    """The dataset's images (and person boxes) as an extraction input list, each once (labels
    kept for multi-class sets)."""
    if dataset.labels.ndim == 1:
        return ImageList(list(dataset.paths), dataset.labels.tolist(), list(dataset.class_names))
    return ImageList(list(dict.fromkeys(dataset.paths + (dataset.boxes or []))))

