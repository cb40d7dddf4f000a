"""Boxes from localisation nets: the centre-crop protocol of Table 8 and the dense one of Tables 9–10.

* ``center-crop``: the image rescaled so its smallest side is Q, its central 224 crop through the
  net in crop mode; the box of a given (ground-truth) class.
* ``dense``: each localisation net runs fully convolutionally on the image and its flip at its
  own test scales Q (:func:`loc_test_scales`), and every map position gives a box per class (one
  for SCR), mapped back to the original image.  The classification system, one net or the fusion
  of several, each with its own method and scales (:class:`Classifier`), gives the image's class
  posterior exactly as ``vggfeat evaluate`` does (each net's posterior averaged over its scales,
  the nets' posteriors averaged).  Its top-5 classes, among those the localisation nets can box,
  are the guesses' classes.  For each of them the boxes of all scales, flips and localisation
  nets are merged greedily (:mod:`.merge`); the merged box that gathers the most boxes (the
  highest accumulated class score) is the guess for that class, rated by the class's posterior.
  The 5 guesses are ranked by that score.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..choices import DEFAULT_LOC_CLASSIFIER, LOC_CLASSIFIER_METHODS, LOC_METHODS
from ..data.folders import net_class_names
from ..data.images import read_image, rescale_views
from ..devices import default_device
from ..errors import ConfigError
from ..evaluate.methods import Evaluator
from ..evaluate.run import default_test_scales
from ..evaluate.run import model_train_scale
from ..models.configs import INPUT_SIZE
from ..models.factory import vgg
from ..models.runner import DeviceRunner, ShapeBatches
from ..models.vgg import VGG
from ..models.weights import OfflineError
from .geometry import decode, dense_boxes, to_original, view_geometry
from .merge import DEFAULT_THRESHOLD, best_boxes
from .net import BoxHead, class_boxes, head_of, load_localizer

METHODS = LOC_METHODS
CLASSIFIER_METHODS = LOC_CLASSIFIER_METHODS
# The class scores of the dense protocol by default: torchvision's VGG-16 (config D), dense at
# vggfeat evaluate's scales for a net of unknown S, 256,384,512.  The paper's own (Sect. 4.5)
# fuses D and E, dense+multi-crop: pass both nets to reproduce it.
DEFAULT_CLASSIFIER = DEFAULT_LOC_CLASSIFIER
TOP_K = 5


@dataclass(frozen=True)
class Guess:
    """One (class, box, score) guess; the box is (xmin, ymin, xmax, ymax) in original pixels."""

    class_index: int  # in the classification net's class order
    wnid: str
    box: tuple[float, float, float, float]
    score: float  # the class's posterior by the classification system (1.0 for center-crop)


def loc_test_scales(method: str, model: VGG) -> tuple[int, ...]:
    """A localisation net's test scales Q.

    ``dense``: the ``test_scales`` its recipe records (``recipes/loc-D-384.yaml``: 352,384, as in
    Table 9's fusion), else Q = the training scale S it records (Table 9's single-scale rows),
    else 384.  ``center-crop``: Q = S (Table 8), else 256.
    """
    recipe = model.weights_meta.get("recipe")
    recorded = recipe.get("test_scales") if isinstance(recipe, dict) else None
    if method == "dense" and isinstance(recorded, (list, tuple)) and recorded and \
            all(isinstance(q, int) for q in recorded):
        return tuple(recorded)
    s = model.weights_meta.get("train_scale")
    if isinstance(s, (int, str)) and str(s).isdigit():
        return (int(s),)
    return (256,) if method == "center-crop" else (384,)


@dataclass(frozen=True)
class Classifier:
    """One net of the classification system that picks and rates the dense protocol's classes.

    ``method``: ``dense``, ``multi-crop`` or ``dense+multi-crop`` (as ``vggfeat evaluate
    --method``); ``scales``: its test scales Q (default: ``vggfeat evaluate``'s, the paper's for
    the S its weights record).  The paper's best system (Sect. 4.5) is D and E trained at
    S∈[256;512], ``dense+multi-crop`` at Q=256,384,512, fused.
    """

    net: VGG
    method: str = "dense"
    scales: tuple[int, ...] | None = None

    def test_scales(self) -> tuple[int, ...]:
        return tuple(self.scales or default_test_scales(self.method, model_train_scale(self.net)))


def parse_classifier(spec: str) -> tuple[str, str, tuple[int, ...] | None]:
    """``WEIGHTS[@METHOD][@Q,Q,…]`` → (weights, method, scales), e.g.
    ``runs/E-256-512/final.safetensors@dense+multi-crop@256,384,512`` or ``torchvision``."""
    parts = os.fspath(spec).split("@")
    method, scales = "dense", None
    seen: dict[str, str] = {}  # "method"/"scales" → the part that gave it
    while len(parts) > 1:  # peel method and scales off the end; a path may hold an "@"
        last = parts[-1].replace(" ", "")
        if last in CLASSIFIER_METHODS:
            kind, method = "method", last
        elif last and all(q.isdigit() for q in last.split(",")):
            kind, scales = "scales", tuple(int(q) for q in last.split(","))
        elif "/" in last or "." in last:  # part of a path
            break
        else:
            raise ConfigError(f"classification net {spec!r}: {last!r} is neither a method "
                              f"({', '.join(CLASSIFIER_METHODS)}) nor scales such as 256,384")
        if kind in seen:
            raise ConfigError(f"classification net {spec!r}: two {kind} parts, {last!r} and "
                              f"{seen[kind]!r}; give one {kind} part "
                              f"(WEIGHTS[@METHOD][@Q,Q,…], e.g. torchvision@dense@256,384,512)")
        seen[kind] = last
        parts.pop()
    weights = "@".join(parts)
    if not weights:
        raise ConfigError(f"classification net {spec!r}: give WEIGHTS[@METHOD][@Q,Q,…], e.g. "
                          "torchvision@dense@256,384,512")
    if scales is not None and min(scales) < INPUT_SIZE:
        raise ConfigError(f"classification net {spec!r}: scales must be ≥ {INPUT_SIZE}, got "
                          f"{','.join(map(str, scales))}")
    return weights, method, scales


def classification_nets(method: str, cls_weights: str | list | None) -> list[str] | None:
    """The classification nets (``WEIGHTS[@METHOD][@Q,Q,…]``) a protocol runs: for ``dense``
    the given ones, else :data:`DEFAULT_CLASSIFIER`; none for ``center-crop``, which boxes the
    true class."""
    if method != "dense":
        return None
    specs = [cls_weights] if isinstance(cls_weights, (str, os.PathLike)) else \
        list(cls_weights or ())
    return specs or [DEFAULT_CLASSIFIER]


def _as_classifiers(cls_net) -> list[Classifier]:
    nets = [] if cls_net is None else [cls_net] if isinstance(cls_net, (VGG, Classifier)) \
        else list(cls_net)
    out = [c if isinstance(c, Classifier) else Classifier(c) for c in nets]
    for c in out:
        if c.method not in CLASSIFIER_METHODS:
            raise ConfigError(f"a classification net of the dense protocol runs "
                              f"{', '.join(CLASSIFIER_METHODS)}, not {c.method!r}")
        if min(c.test_scales()) < INPUT_SIZE:
            raise ConfigError(f"classification scales must be ≥ {INPUT_SIZE}, got "
                              f"{c.test_scales()}")
    return out


def _classification_net(source: str, spec: str) -> VGG:
    """The net of a ``--cls-weights`` spec; without a network, the error says which spec
    (the default one too) asked for hub weights and how to give a file or random weights."""
    try:
        return vgg(weights=source)
    except OfflineError as err:
        what = "the default classifier" if os.fspath(spec) == DEFAULT_CLASSIFIER else \
            "the classification net"
        raise err.for_option(f"{what} (--cls-weights {spec})", "--cls-weights",
                             "cls_weights") from err


class BoxMaps(DeviceRunner):
    """A localisation net run densely on same-shape images and their mirror images."""

    def forward_views(self, scale: int, batch: Tensor) -> Tensor:
        """uint8 N×3×H×W → the box maps N×2×4C×h×w (image, then flip) on the host."""
        return self.flip_pass(batch).transpose(0, 1).cpu()


def class_names_of(model: VGG) -> list[str]:
    """Class names a net's weights record; the ImageNet WordNet ids for any 1000-class net."""
    names = net_class_names(model)
    if names is not None:
        return names
    raise ConfigError(f"the classification net has {model.num_classes} classes but its weights "
                      "record no class names; use a net trained by vggfeat, or a 1000-class "
                      "ImageNet net")


class Localizer:
    """Localisation nets (one or more, same protocol) and, for ``dense``, a classification system
    (one net or several fused, see :class:`Classifier`).

    Call :meth:`dense` or :meth:`center_crop` on views made by :meth:`prepare`, or
    :meth:`__call__` on an image file or uint8 tensor for its top-5 guesses.  Many images run
    the dense protocol together through :meth:`stream` (same-shape views of a window of
    consecutive images share forward passes, as in ``vggfeat extract``), each finished image's
    results then giving its guesses through :meth:`dense_guesses`.  ``scales``, when
    given, is every localisation net's Q; by default each net runs at its own
    (:func:`loc_test_scales`).  ``backend`` says how the nets' layers run
    (:mod:`vggfeat.models.backends`).
    """

    def __init__(self, loc_nets: VGG | list[VGG], cls_net=None, *, method: str = "dense",
                 scales: tuple[int, ...] | None = None, top_k: int = TOP_K,
                 merge_threshold: float = DEFAULT_THRESHOLD,
                 device: str | torch.device | None = None, batch_size: int = 8,
                 amp: str | None = None, channels_last: bool = True,
                 backend: str = "auto") -> None:
        loc_nets = [loc_nets] if isinstance(loc_nets, VGG) else list(loc_nets)
        if method not in METHODS:
            raise ConfigError(f"unknown localisation protocol {method!r}; choose "
                              f"{' or '.join(METHODS)}")
        if not loc_nets:
            raise ConfigError("give at least one localisation net")
        if method == "center-crop" and len(loc_nets) > 1:
            raise ConfigError("the center-crop protocol scores one localisation net at a time")
        classifiers = _as_classifiers(cls_net) if method == "dense" else []
        if method == "dense" and not classifiers:
            raise ConfigError("dense localisation needs a classification net for the class "
                              "scores (--cls-weights)")
        self.heads: list[BoxHead] = [head_of(m) for m in loc_nets]
        run = dict(device=device or default_device(), batch_size=batch_size, amp=amp,
                   channels_last=channels_last, backend=backend)
        self.locs = [BoxMaps(m, **run) for m in loc_nets]
        self.classifiers = classifiers
        self.cls = [Evaluator(c.net, c.method, **run) for c in classifiers]
        self.cls_scales = [c.test_scales() for c in classifiers]
        self.method = method
        self.net_scales = [tuple(scales or loc_test_scales(method, m)) for m in loc_nets]
        self.scales = tuple(sorted({q for qs in self.net_scales for q in qs}))
        if min(self.scales) < INPUT_SIZE:
            raise ConfigError(f"localisation needs scales Q ≥ {INPUT_SIZE} (the net's window), "
                              f"got {self.scales}")
        if method == "center-crop" and len(self.scales) > 1:
            raise ConfigError(f"the center-crop protocol uses one scale, got {self.scales}")
        # Every view an image needs, once: the localisation nets' and the classifiers' scales.
        self.view_scales = tuple(sorted({*self.scales, *(q for qs in self.cls_scales
                                                          for q in qs)}))
        self.top_k, self.merge_threshold = top_k, merge_threshold
        self.class_names = self._classifier_classes() if classifiers else \
            list(self.heads[0].class_names)
        self._columns = [self._head_columns(head) for head in self.heads]
        # Classes some localisation net can box: only these are ranked (SCR boxes every class).
        self.localizable = np.any([c >= 0 for c in self._columns], axis=0)
        if method == "dense":
            self._warn_about_class_sets()

    def _classifier_classes(self) -> list[str]:
        names = [class_names_of(c.net) for c in self.classifiers]
        if any(n != names[0] for n in names[1:]):
            raise ConfigError("the classification nets predict different classes; fuse nets "
                              "of the same classes")
        return names[0]

    def _head_columns(self, head: BoxHead) -> np.ndarray:
        """Column of each classification class in a head's boxes (-1: the head lacks it)."""
        index = {name: k for k, name in enumerate(head.class_names)}
        columns = np.array([0 if head.kind == "scr" else index.get(name, -1)
                            for name in self.class_names])
        if (columns < 0).all():
            raise ConfigError(f"the PCR localisation net boxes {len(head.class_names)} classes "
                              f"({', '.join(head.class_names[:3])} …), none of which the "
                              "classification net predicts; use a classifier of the same "
                              "classes")
        return columns

    def _warn_about_class_sets(self) -> None:
        """One warning when the classifier's classes and the boxed ones differ."""
        boxed = {n for h in self.heads for n in h.class_names} \
            if all(h.kind == "pcr" for h in self.heads) else set(self.class_names)
        unboxed = int((~self.localizable).sum())
        unknown = len(boxed - set(self.class_names))
        if unboxed or unknown:
            warnings.warn(
                f"{unboxed} of the classifier's {len(self.class_names)} classes have no box in "
                f"the localisation net(s), which box {len(boxed)} classes"
                + (f" ({unknown} of them not among the classifier's)" if unknown else "")
                + f": guesses are ranked among the {int(self.localizable.sum())} classes both "
                "know", stacklevel=3)

    def settings(self) -> dict:
        """What the guesses depend on (a journal of other settings is refused)."""
        return {"method": self.method, "scales": [list(qs) for qs in self.net_scales],
                "classifiers": [[c.method, list(qs)] for c, qs in
                                zip(self.classifiers, self.cls_scales)],
                "classes": len(self.class_names), "top_k": self.top_k,
                "merge_threshold": self.merge_threshold,
                "weights": [r.model.weights_meta.get("sha256") for r in [*self.locs, *self.cls]]}

    @classmethod
    def from_weights(cls, weights: str | os.PathLike | list, cls_weights: str | list | None = None,
                     **kwargs) -> Localizer:
        """From weights files: localisation net(s) and, for ``dense``, the classification
        net(s), each ``WEIGHTS[@METHOD][@Q,Q,…]`` (:func:`parse_classifier`)."""
        paths = [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
        specs = [] if cls_weights is None else [cls_weights] \
            if isinstance(cls_weights, (str, os.PathLike)) else list(cls_weights)
        parsed = [parse_classifier(spec) for spec in specs]  # a typo fails before any loading
        loc_nets = [load_localizer(p)[0] for p in paths]
        classifiers = [Classifier(_classification_net(source, spec), method, scales)
                       for spec, (source, method, scales) in zip(specs, parsed)]
        return cls(loc_nets, classifiers or None, **kwargs)

    def prepare(self, image: Tensor) -> list[Tensor]:
        """uint8 3×H×W → one view per scale of :attr:`view_scales`, then the original size as a
        tensor (H, W): what the data loader workers do (a list of tensors, as the loader pins
        them)."""
        crop = INPUT_SIZE if self.method == "center-crop" else None
        return [*rescale_views(image, self.view_scales, crop=crop),
                torch.tensor(image.shape[-2:])]

    @staticmethod
    def unpack(prepared: list[Tensor]) -> tuple[list[Tensor], tuple[int, int]]:
        """(views, (H, W)) of a :meth:`prepare` result."""
        return prepared[:-1], tuple(prepared[-1].tolist())

    def __call__(self, image: str | os.PathLike | Tensor, *, class_index: int | None = None
                 ) -> list[Guess]:
        """Top-k guesses for an image file or uint8 3×H×W tensor (``dense``), or, for
        ``center-crop``, the one guess for ``class_index``."""
        if not isinstance(image, Tensor):
            image = read_image(image)
        views, size = self.unpack(self.prepare(image))
        if self.method == "dense":
            return self.dense(views, size)
        if class_index is None:
            raise ConfigError("the center-crop protocol boxes a given class: pass class_index")
        box = self.center_crop([views], [size], torch.tensor([class_index]))[0]
        return [Guess(class_index, self.class_names[class_index], tuple(box.tolist()), 1.0)]

    @torch.inference_mode()
    def center_crop(self, views: list[list[Tensor]], sizes: list[tuple[int, int]],
                    classes: Tensor) -> Tensor:
        """Boxes N×4 (original pixels) for the central 224 crops of N images and their classes
        (indices into :attr:`class_names`)."""
        runner, head, columns = self.locs[0], self.heads[0], self._columns[0]
        crops = torch.stack([v[0] for v in views])
        outputs = []
        for start in range(0, len(crops), runner.batch_size):
            with runner.autocast():
                outputs.append(runner.model(runner.network_input(crops[start:start +
                                                                         runner.batch_size]))
                               .float().cpu())
            runner.forward_passes += 1
            runner.forward_images += len(outputs[-1])
        cols = torch.as_tensor(columns[classes.numpy()])
        if (cols < 0).any():
            raise ConfigError("a ground-truth class is not among the localisation net's classes")
        boxes = decode(class_boxes(torch.cat(outputs), cols, head))
        out = torch.empty(len(views), 4)
        for n, (h, w) in enumerate(sizes):
            g = view_geometry(h, w, self.scales[0])
            top, left = round((g.height - INPUT_SIZE) / 2), round((g.width - INPUT_SIZE) / 2)
            out[n] = to_original(boxes[n] + torch.tensor([left, top, left, top]), g, w, h)
        return out

    @property
    def images_per_forward(self) -> float:
        """Mean number of images in a forward pass of any of the nets so far (flips not
        counted); 0 before any."""
        runners = [*self.locs, *self.cls]
        passes = sum(r.forward_passes for r in runners)
        return sum(r.forward_images for r in runners) / passes if passes else 0.0

    def stream(self, *, on_progress=None) -> ShapeBatches:
        """A :class:`ShapeBatches` running the dense protocol's nets: add an image as
        :meth:`stream_entry` gives it; a finished image's results go to :meth:`dense_guesses`."""
        return ShapeBatches(self._forward_scale, batch_size=self.locs[0].batch_size,
                            window=self.locs[0].window, on_progress=on_progress)

    def stream_entry(self, item: tuple) -> tuple[tuple, list[Tensor]]:
        """A loader item ``(index, prepared, None)`` → ``((index, (H, W), view widths), views)``:
        what :meth:`ShapeBatches.add` takes, the key holding what :meth:`dense_guesses` needs."""
        views, size = self.unpack(item[1])
        return (item[0], size, tuple(v.shape[-1] for v in views)), views

    def _forward_scale(self, s: int, views: list[Tensor]) -> list[dict]:
        """Same-shape views at :attr:`view_scales` ``[s]`` → per image, what each net that runs
        at that scale gives: ``("cls", k)`` a posterior, ``("loc", k)`` box maps."""
        q = self.view_scales[s]
        out = [{} for _ in views]
        for kind, runners, scales in (("cls", self.cls, self.cls_scales),
                                      ("loc", self.locs, self.net_scales)):
            for k, (runner, qs) in enumerate(zip(runners, scales)):
                if q in qs:
                    for row, result in enumerate(runner.forward_batch(s, views)):
                        out[row][kind, k] = result
        return out

    @torch.inference_mode()
    def dense(self, views: list[Tensor], size: tuple[int, int]) -> list[Guess]:
        """Top-k guesses of one image from its views at :attr:`view_scales` (uint8 3×Hq×Wq)."""
        stream = self.stream()
        stream.add(None, views)
        stream.finish()
        [(_, results)] = stream.take()
        return self.dense_guesses(results, size, tuple(v.shape[-1] for v in views))

    def dense_guesses(self, results: list[dict], size: tuple[int, int],
                      widths: tuple[int, ...]) -> list[Guess]:
        """Top-k guesses of one image from its stream results at each view scale, its size
        (H, W) and the widths of its views."""
        posterior = torch.stack([
            runner.rows([[r["cls", k] for r in results if ("cls", k) in r]])[0]
            for k, runner in enumerate(self.cls)]).mean(0)
        found = []  # per localisation net and each of its scales: its boxes, its class columns
        h, w = size
        for k, (scales, columns) in enumerate(zip(self.net_scales, self._columns)):
            for q in scales:
                s = self.view_scales.index(q)
                maps = results[s]["loc", k]  # 2×4C×h×w: the image, then its flip
                boxes = dense_boxes(maps.unflatten(1, (-1, 4)), widths[s])  # 2×B×h×w×4
                found.append((to_original(boxes, view_geometry(h, w, q), w, h), columns))
        return self._ranked_guesses(posterior, found)

    def _ranked_guesses(self, posterior: Tensor, found: list[tuple[Tensor, np.ndarray]]
                        ) -> list[Guess]:
        """The top-k localisable classes of ``posterior``, each with the merged box that
        gathers the most of its boxes in ``found``, best first."""
        ranked = posterior.masked_fill(torch.as_tensor(~self.localizable), -1.0)
        k = min(self.top_k, int(self.localizable.sum()))
        top = ranked.topk(k).indices.tolist()
        groups = []  # per top class: every box predicted for it
        for c in top:
            groups.append(torch.cat([boxes[:, col].reshape(-1, 4) for boxes, columns in found
                                     if (col := columns[c]) >= 0]))
        n = max(len(b) for b in groups)
        padded, valid = np.zeros((len(top), n, 4)), np.zeros((len(top), n), bool)
        for g, b in enumerate(groups):
            padded[g, :len(b)], valid[g, :len(b)] = b, True
        # Every box of a class carries that class's score, so the merged box holding the most
        # boxes has the highest accumulated score.
        best, _ = best_boxes(padded, valid.astype(np.float64), threshold=self.merge_threshold,
                             valid=valid)
        guesses = [Guess(c, self.class_names[c], tuple(float(v) for v in best[g]),
                         float(posterior[c])) for g, c in enumerate(top)]
        return sorted(guesses, key=lambda guess: -guess.score)

    def class_scores(self, views: dict[int, Tensor]) -> Tensor:
        """The classification system's posterior (K) of one image from its views by scale: each
        net's as ``vggfeat evaluate --method`` gives it (averaged over the net's scales), the
        nets' averaged as ``vggfeat evaluate --fuse`` does."""
        rows = [runner([[views[q] for q in scales]])[0]
                for runner, scales in zip(self.cls, self.cls_scales)]
        return torch.stack(rows).mean(0)


def localize(image: str | os.PathLike | Tensor, *, weights: str | os.PathLike | list,
             cls_weights: str | list[str] = DEFAULT_CLASSIFIER,
             scales: tuple[int, ...] | None = None, top_k: int = TOP_K,
             device: str | None = None, backend: str = "auto") -> list[Guess]:
    """The top-5 (class, box, score) guesses for one image, in one call.

    Args:
        image: an image file or a uint8 RGB tensor 3×H×W.
        weights: localisation net weights file(s) (made by ``vggfeat localize train``).
        cls_weights: the classification net(s), each ``WEIGHTS[@METHOD][@Q,Q,…]`` with WEIGHTS
            ``torchvision``, ``timm`` or a file (several: their posteriors are fused).
        scales: test scales Q of every localisation net (default: each net's own, see
            :func:`loc_test_scales`).
        device: where the nets run (default: cuda when available).
        backend: how the nets' layers run: ``auto``, ``eager`` or ``winograd``.

    Returns:
        Up to ``top_k`` :class:`Guess` es, best first; boxes in pixels of the original image.
    """
    localizer = Localizer.from_weights(weights, cls_weights, method="dense", scales=scales,
                                       top_k=top_k, device=device, backend=backend)
    return localizer(image)
