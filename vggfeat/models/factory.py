"""``vggfeat.vgg()``: build any config of Table 1, initialised or with weights attached."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .configs import FC_DIM, NUM_CLASSES, parse_arch
from .convert import to_vggfeat
from .init import init_weights, preinit_from_a
from .preprocessing import CAFFE, IMAGENET, Preprocessing, get_preprocessing
from .vgg import VGG
from .weights import (
    FORMAT_TAG,
    WeightsError,
    fetch,
    pretrained_for,
    read_weights_file,
    sha256,
)

HUB_SOURCES = ("torchvision", "timm")


def vgg(arch: str | None = None, *, weights: str | os.PathLike | None = None,
        batch_norm: bool | None = None, num_classes: int | None = None,
        width_mult: float | None = None, fc_dim: int | None = None, dropout: float = 0.5,
        init: str = "glorot", seed: int | None = None, init_from_a: str | os.PathLike | VGG | None = None,
        preprocessing: str | Preprocessing | None = None, download: bool = True,
        progress: bool = True) -> VGG:
    """Build a VGG of Table 1.

    Args:
        arch: ``"A"``, ``"A-LRN"``, ``"B"``, ``"C"``, ``"D"``, ``"E"`` or an alias (``"vgg16"``,
            ``"vgg19_bn"``).  May be omitted when ``weights`` is a vggfeat file, which records it;
            otherwise defaults to ``"D"``.
        weights: ``None`` or ``"random"`` (initialised by ``init`` with ``seed``),
            ``"torchvision"``, ``"timm"``, or a path to a ``.safetensors``/``.pth``/``.pt`` file in
            vggfeat, torchvision, timm or Caffe-converted layout.
        batch_norm, num_classes, width_mult, fc_dim, dropout: see :class:`VGG`.
        init: ``"paper"`` (N(0, 0.01²)), ``"glorot"`` or ``"kaiming"``; used without weights.
        seed: seed of the initialisation (``weights="random"`` defaults it to 0).
        init_from_a: a trained net A (model or weights path) whose conv1_1, conv2_1, conv3_1,
            conv3_2 and fc6–fc8 pre-initialise this net (Sect. 3.1).
        preprocessing: override the input normalisation the weights carry
            (``"paper"``, ``"imagenet"``, ``"caffe"``).
        download: allow fetching hub weights missing from the cache (also off when
            ``VGGFEAT_OFFLINE`` or ``HF_HUB_OFFLINE`` is set).
    """
    state_dict, file_meta, provenance = None, {}, {"source": "random"}
    if weights is not None and str(weights) not in ("random", *HUB_SOURCES):
        path = Path(weights)
        state_dict, file_meta = read_weights_file(path)
        provenance = {"source": "file", "file": str(path.resolve()), "sha256": sha256(path)}
    config = _resolve_config(arch, file_meta, batch_norm=batch_norm, num_classes=num_classes,
                             width_mult=width_mult, fc_dim=fc_dim)
    model = VGG(**config, dropout=dropout)

    if str(weights) in HUB_SOURCES:
        if (config["num_classes"], config["width_mult"], config["fc_dim"]) != (NUM_CLASSES, 1.0, FC_DIM):
            raise ValueError(f"{weights} weights are for the full-width 1000-class net; drop "
                             "num_classes/width_mult/fc_dim or use weights=None")
        entry = pretrained_for(model.spec, str(weights))
        path = fetch(entry, download=download, progress=progress)
        state_dict, _ = read_weights_file(path)
        provenance = {"source": entry.source, "name": entry.location, "file": str(path),
                      "sha256": sha256(path), **entry.meta}
        model.preprocessing = entry.preprocessing

    if state_dict is None:
        init_weights(model, init, seed=0 if weights == "random" and seed is None else seed)
        provenance.update(init=init, seed=seed)
        if init_from_a is not None:
            net_a = init_from_a if isinstance(init_from_a, VGG) else vgg("A", weights=init_from_a)
            if net_a.spec.config != "A":
                raise ValueError(f"init_from_a must be a net A, got VGG {net_a.spec.name}")
            provenance["preinit_from_a"] = preinit_from_a(model, net_a) and net_a.weights_meta
    else:
        converted, fmt = to_vggfeat(state_dict, model)
        model.load_state_dict(converted)
        provenance["layout"] = fmt
        if "preprocessing" in file_meta:
            model.preprocessing = Preprocessing.from_json(file_meta["preprocessing"])
        elif fmt == "caffe":
            model.preprocessing = CAFFE
        elif provenance["source"] == "file":
            model.preprocessing = IMAGENET
        if "meta" in file_meta:
            provenance = {**json.loads(file_meta["meta"]), **provenance}
    if preprocessing is not None:
        model.preprocessing = get_preprocessing(preprocessing)
    model.weights_meta = provenance
    return model


def _resolve_config(arch: str | None, file_meta: dict, **overrides) -> dict:
    """Architecture options: a vggfeat file's record, checked against what the caller asked."""
    recorded = json.loads(file_meta["config"]) if file_meta.get("format") == FORMAT_TAG else {}
    if recorded:
        if arch is not None:
            spec = parse_arch(arch, batch_norm=overrides["batch_norm"])
            if (spec.config, spec.batch_norm) != (recorded["arch"], recorded["batch_norm"]):
                raise WeightsError(f"the weights file holds VGG {recorded['arch']}"
                                   f"{'-BN' if recorded['batch_norm'] else ''}, not the requested "
                                   f"{spec.name}; drop the arch argument or pick the matching file")
        for key, value in overrides.items():
            if value is not None and value != recorded[key]:
                raise WeightsError(f"the weights file was made with {key}={recorded[key]}, "
                                   f"not {value}")
        return recorded
    spec = parse_arch(arch or "D", batch_norm=overrides["batch_norm"])
    return {"arch": spec.config, "batch_norm": spec.batch_norm,
            "num_classes": overrides["num_classes"] or NUM_CLASSES,
            "width_mult": overrides["width_mult"] or 1.0, "fc_dim": overrides["fc_dim"] or FC_DIM}
