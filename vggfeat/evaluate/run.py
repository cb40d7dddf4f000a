"""``vggfeat evaluate``: ImageNet top-1/top-5 error as in Tables 3–6, posteriors, fusion, reports."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import torch

from ..cache.store import STR
from ..data.images import rescale_views
from ..data.loader import image_loader
from ..data.sources import ImageList
from ..devices import default_device, default_workers
from ..errors import InputError
from ..fileio import atomic_path, write_json_atomic
from ..models.configs import INPUT_SIZE
from ..models.vgg import VGG
from ..progress import image_bar
from .methods import CENTER_CROP_RESIZE, Evaluator, topk_error, topk_misses

# (config, training scale S, method, test scales) → (top-1, top-5) error %, paper Tables 3–5.
JITTER = "256-512"
PAPER_ROWS: dict[tuple[str, str, str, tuple[int, ...]], tuple[float, float, str]] = {
    ("A", "256", "dense", (256,)): (29.6, 10.4, "Table 3"),
    ("A-LRN", "256", "dense", (256,)): (29.7, 10.5, "Table 3"),
    ("B", "256", "dense", (256,)): (28.7, 9.9, "Table 3"),
    ("C", "256", "dense", (256,)): (28.1, 9.4, "Table 3"),
    ("C", "384", "dense", (384,)): (28.1, 9.3, "Table 3"),
    ("C", JITTER, "dense", (384,)): (27.3, 8.8, "Table 3"),
    ("D", "256", "dense", (256,)): (27.0, 8.8, "Table 3"),
    ("D", "384", "dense", (384,)): (26.8, 8.7, "Table 3"),
    ("D", JITTER, "dense", (384,)): (25.6, 8.1, "Table 3"),
    ("E", "256", "dense", (256,)): (27.3, 9.0, "Table 3"),
    ("E", "384", "dense", (384,)): (26.9, 8.7, "Table 3"),
    ("E", JITTER, "dense", (384,)): (25.5, 8.0, "Table 3"),
    ("B", "256", "dense", (224, 256, 288)): (28.2, 9.6, "Table 4"),
    ("C", "256", "dense", (224, 256, 288)): (27.7, 9.2, "Table 4"),
    ("C", "384", "dense", (352, 384, 416)): (27.8, 9.2, "Table 4"),
    ("C", JITTER, "dense", (256, 384, 512)): (26.3, 8.2, "Table 4"),
    ("D", "256", "dense", (224, 256, 288)): (26.6, 8.6, "Table 4"),
    ("D", "384", "dense", (352, 384, 416)): (26.5, 8.6, "Table 4"),
    ("D", JITTER, "dense", (256, 384, 512)): (24.8, 7.5, "Table 4/5"),
    ("E", "256", "dense", (224, 256, 288)): (26.9, 8.7, "Table 4"),
    ("E", "384", "dense", (352, 384, 416)): (26.7, 8.6, "Table 4"),
    ("E", JITTER, "dense", (256, 384, 512)): (24.8, 7.5, "Table 4/5"),
    ("D", JITTER, "multi-crop", (256, 384, 512)): (24.6, 7.5, "Table 5"),
    ("D", JITTER, "dense+multi-crop", (256, 384, 512)): (24.4, 7.2, "Table 5"),
    ("E", JITTER, "multi-crop", (256, 384, 512)): (24.6, 7.4, "Table 5"),
    ("E", JITTER, "dense+multi-crop", (256, 384, 512)): (24.4, 7.1, "Table 5"),
}

# Table 6: fusions, each net written "config/S/method/Q" (the paper's "(D/[256;512]/256,384,512)").
_SUBMISSION = ("D/256/dense/224,256,288", "D/384/dense/352,384,416", "D/256-512/dense/256,384,512",
               "C/256/dense/224,256,288", "C/384/dense/352,384,416", "E/256/dense/224,256,288",
               "E/384/dense/352,384,416")
PAPER_FUSION: dict[frozenset[str], tuple[float, float, str]] = {
    frozenset(_SUBMISSION): (24.7, 7.5, "Table 6, ILSVRC submission"),
    frozenset({"D/256-512/dense/256,384,512", "E/256-512/dense/256,384,512"}):
        (24.0, 7.1, "Table 6"),
    frozenset({"D/256-512/multi-crop/256,384,512", "E/256-512/multi-crop/256,384,512"}):
        (23.9, 7.2, "Table 6"),
    frozenset({"D/256-512/dense+multi-crop/256,384,512",
               "E/256-512/dense+multi-crop/256,384,512"}): (23.7, 6.8, "Table 6"),
}


def model_train_scale(model: VGG) -> str | None:
    """The training scale S the weights record: "256", "384" or "256-512"; None if unknown."""
    s = model.weights_meta.get("train_scale")
    if s is None:
        return None
    return "-".join(str(v) for v in s) if isinstance(s, (list, tuple)) else str(s)


def default_test_scales(method: str, s: str | None) -> tuple[int, ...]:
    """The paper's test scales: {S−32, S, S+32} for fixed S, {256, 384, 512} for jittered S.

    Scales below the net's 224 window are raised to 224 (duplicates dropped): a net trained at
    S = 224 is tested at 224, 256, as dense and multi-crop evaluation need Q ≥ 224.
    """
    if method == "center-crop":
        return (CENTER_CROP_RESIZE,)
    if s is None or "-" in s:
        return (256, 384, 512)
    q = int(s)
    return tuple(sorted({max(INPUT_SIZE, v) for v in (q - 32, q, q + 32)}))


@dataclass
class EvalResult:
    posteriors: np.ndarray  # N×K float32
    labels: np.ndarray  # N int64
    paths: list[str]
    method: str
    scales: tuple[int, ...]
    attrs: dict = field(default_factory=dict)
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_forward: float = 0.0  # mean images per same-shape forward pass, flips not counted
    backend: str = ""  # what ran the net (see vggfeat.models.backends)

    @property
    def top1_error(self) -> float:
        return topk_error(self.posteriors, self.labels, 1)

    @property
    def top5_error(self) -> float:
        return topk_error(self.posteriors, self.labels, 5)

    def summary(self) -> dict:
        return {"top1_error": round(self.top1_error, 3), "top5_error": round(self.top5_error, 3),
                "images": len(self.labels), "failed": len(self.failed), "method": self.method,
                "scales": list(self.scales), "seconds": round(self.seconds, 1),
                "images_per_forward": round(self.images_per_forward, 2),
                **({"backend": self.backend} if self.backend else {}), **self.attrs}


def evaluate(images: ImageList, model: VGG, *, method: str = "dense",
             scales: tuple[int, ...] | None = None, train_scale: str | None = None,
             batch_size: int = 8, workers: int | None = None, device: str | None = None,
             amp: str | None = None, channels_last: bool = True, backend: str = "auto",
             progress: bool = True) -> EvalResult:
    """Posteriors and errors of ``model`` on labelled ``images`` with a Sect. 3.2 method.

    ``scales`` default to the paper's for the training scale S: ``train_scale`` ("256", "384",
    "256-512") when given, else what the weights record.  ``workers`` default to half the cores
    (at most 8), ``device`` to CUDA when available; ``backend`` says how the net's layers run
    (:mod:`vggfeat.models.backends`).  ``model`` is left as it is (mode, device,
    memory format, metadata); see :class:`DeviceRunner`.
    """
    device = device or default_device()
    workers = default_workers() if workers is None else workers
    s = str(train_scale) if train_scale else model_train_scale(model)
    if images.labels is None:
        raise InputError("evaluation needs labelled images (class folders or a labelled list)")
    scales = scales or default_test_scales(method, s)
    if method != "center-crop" and min(scales) < 224:
        raise InputError(f"{method} evaluation needs scales ≥ 224, got {scales}")
    start = time.monotonic()
    evaluator = Evaluator(model, method, device=device, batch_size=batch_size, amp=amp,
                          channels_last=channels_last, backend=backend)
    crop = 224 if method == "center-crop" else None
    loader = image_loader(images.paths, np.arange(len(images)),
                          partial(rescale_views, scales=scales, crop=crop), batch_size=batch_size,
                          workers=workers, pin_memory=device.startswith("cuda"))
    rows, kept, failed = [], [], []
    labels = np.asarray(images.labels)
    misses = 0  # running top-1 count for the progress bar: O(batch) per update, not O(images)
    # Same-shape images run together across batches; posteriors come back in input order.
    with image_bar(len(images), disable=not progress, desc=f"evaluate {method}") as bar:
        for done, unread in evaluator.run_loader(loader, on_progress=bar.update):
            failed += [(images.paths[i], reason) for i, _, reason in unread]
            if done:
                rows.append(evaluator.rows([r for _, r in done]).numpy())
                kept += [i for i, _ in done]
                misses += topk_misses(rows[-1], labels[[i for i, _ in done]], 1)
            if kept:
                bar.set_postfix(top1_err=f"{100.0 * misses / len(kept):.1f}", failed=len(failed),
                                refresh=False)
    attrs = {"arch": model.spec.name, "train_scale": s or "",
             "weights": model.weights_meta.get("name") or model.weights_meta.get("file") or "random"}
    return EvalResult(np.concatenate(rows) if rows else np.empty((0, model.num_classes), np.float32),
                      np.asarray(images.labels, np.int64)[kept], [images.paths[i] for i in kept],
                      method, tuple(scales), attrs, failed, time.monotonic() - start,
                      evaluator.images_per_forward, evaluator.backend)


def save_posteriors(result: EvalResult, path: str | os.PathLike) -> Path:
    """HDF5 with ``posteriors`` (N×K), ``labels``, ``paths`` and the settings as attributes."""
    path = Path(path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("posteriors", data=result.posteriors.astype(np.float32))
        f["labels"] = result.labels
        f.create_dataset("paths", data=result.paths, dtype=STR)
        f.attrs.update({k: v for k, v in result.attrs.items()})
        f.attrs["method"], f.attrs["scales"] = result.method, list(result.scales)
    return path


def load_posteriors(path: str | os.PathLike) -> EvalResult:
    with h5py.File(path, "r") as f:
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}
        paths = [p.decode() if isinstance(p, bytes) else p for p in f["paths"][:]]
        return EvalResult(f["posteriors"][:], f["labels"][:], paths, attrs.pop("method"),
                          tuple(attrs.pop("scales")), attrs)


def fuse(results: list[EvalResult]) -> EvalResult:
    """Model fusion (Sect. 4.4): average the posteriors of several nets on the same images."""
    if len(results) < 2:
        raise InputError("fusion needs at least two posterior files")
    first = results[0]
    common = set(first.paths).intersection(*(r.paths for r in results[1:]))
    if len(common) < len(first.paths):
        raise InputError(f"the posterior files cover different images ({len(common)} in common of "
                         f"{len(first.paths)}); evaluate every net on the same folder")
    aligned = []
    for r in results:
        order = {p: i for i, p in enumerate(r.paths)}
        idx = [order[p] for p in first.paths]
        if not np.array_equal(r.labels[idx], first.labels):
            raise InputError("the posterior files disagree on the labels of the same images")
        aligned.append(torch.as_tensor(r.posteriors[idx]))
    members = [m for r in results for m in fusion_members(r)]
    arch = "+".join(str(r.attrs.get("arch", "?")) for r in results)
    train_scales = "+".join(dict.fromkeys(str(r.attrs.get("train_scale") or "?") for r in results))
    # "fusion", not the members' methods joined: "dense+multi-crop" is a method of its own
    # (Table 5); each member's method and Q stay in ``members`` and the report's row.
    return EvalResult(torch.stack(aligned).mean(0).numpy(), first.labels, first.paths, "fusion",
                      tuple(sorted({q for r in results for q in r.scales})),
                      {"arch": arch, "train_scale": train_scales, "fused": len(members),
                       "members": members})


def fusion_members(result: EvalResult) -> list[str]:
    """The nets averaged into ``result``, each as "config/S/method/Q" (one if not fused)."""
    if "members" in result.attrs:
        return list(result.attrs["members"])
    return [f"{result.attrs.get('arch', '?')}/{result.attrs.get('train_scale') or '?'}/"
            f"{result.method}/{','.join(map(str, sorted(result.scales)))}"]


def paper_row(result: EvalResult) -> tuple[float, float, str] | None:
    """The paper's (top-1, top-5, table) for the same net(s), S, method and Q; None if none."""
    if "members" in result.attrs:
        members = fusion_members(result)
        return PAPER_FUSION.get(frozenset(members)) if len(set(members)) == len(members) else None
    return PAPER_ROWS.get((str(result.attrs.get("arch", "")),
                           str(result.attrs.get("train_scale", "")), result.method,
                           tuple(sorted(result.scales))))


def markdown_report(result: EvalResult) -> str:
    """One table row shaped like the paper's tables, with the paper's figure where it has one."""
    ref = paper_row(result)
    paper = f"{ref[0]:.1f} / {ref[1]:.1f} ({ref[2]})" if ref else "—"
    method, scales = result.method, ",".join(map(str, result.scales))
    if "members" in result.attrs:  # each member's method and test scales, in member order
        members = [m.rsplit("/", 2)[-2:] for m in fusion_members(result)]
        method = f"fusion ({', '.join(dict.fromkeys(m for m, _ in members))})"
        scales = " + ".join(q for _, q in members)
    return ("| net | train S | method | test Q | images | top-1 err % | top-5 err % | paper |\n"
            "|---|---|---|---|---|---|---|---|\n"
            f"| {result.attrs.get('arch', '?')} | {result.attrs.get('train_scale') or '?'} | "
            f"{method} | {scales} | {len(result.labels)} | "
            f"{result.top1_error:.2f} | {result.top5_error:.2f} | {paper} |\n")


def write_json(result: EvalResult, path: str | os.PathLike) -> None:
    write_json_atomic(path, result.summary(), indent=2, sort_keys=False)
