"""``vggfeat.vgg()``: build any config of Table 1, initialised or with weights attached.

Weights are named as torchvision and timm users name them: ``"torchvision"``, ``"timm"``, a
file, a torchvision enum (``VGG16_Weights.IMAGENET1K_V1``, ``VGG16_Weights.DEFAULT``),
``"DEFAULT"`` or ``True`` (``pretrained=True`` says the same).  A ``num_classes`` other than the
weights' keeps the pretrained body and gives a new fc8, as timm's
``create_model(..., pretrained=True, num_classes=K)`` does.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, InputError, WeightsError
from .configs import FC_DIM, NUM_CLASSES, parse_arch
from .convert import describe_config, infer_config, to_vggfeat
from .init import init_weights, preinit_from_a
from .preprocessing import CAFFE, IMAGENET, Preprocessing, get_preprocessing
from .vgg import VGG
from .weights import (
    FORMAT_TAG,
    fetch,
    pretrained_for,
    pretrained_table,
    read_weights_file,
    sha256,
)

HUB_SOURCES = ("torchvision", "timm")
# What ``True``, ``"DEFAULT"`` and ``pretrained=True`` load (timm's tv_in1k are the same numbers).
DEFAULT_SOURCE = "torchvision"
ARCH_OPTIONS = ("batch_norm", "width_mult", "fc_dim")


class NewHeadWarning(UserWarning):
    """fc8 was re-initialised for another number of classes on top of pretrained weights."""


@dataclass
class _Weights:
    """A state dict to load, the config it belongs to, and where it came from."""

    state_dict: dict
    config: dict
    provenance: dict
    preprocessing: Preprocessing | None  # None: as the file's layout implies
    recorded: bool = False  # the config comes from the file's vggfeat metadata, not its shapes


def vgg(arch: str | None = None, *, weights=None, pretrained: bool | None = None,
        batch_norm: bool | None = None, num_classes: int | None = None,
        width_mult: float | None = None, fc_dim: int | None = None, dropout: float = 0.5,
        init: str = "glorot", seed: int | None = None, init_from_a: str | os.PathLike | VGG | None = None,
        preprocessing: str | Preprocessing | None = None, download: bool = True,
        progress: bool = True) -> VGG:
    """Build a VGG of Table 1.

    Args:
        arch: ``"A"``, ``"A-LRN"``, ``"B"``, ``"C"``, ``"D"``, ``"E"`` or an alias (``"vgg16"``,
            ``"vgg19_bn"``).  May be omitted when ``weights`` says it (a file, whose config is
            recorded or read from its shapes, or a torchvision enum); otherwise ``"D"``.
        weights: ``None`` or ``"random"`` (initialised by ``init`` with ``seed``),
            ``"torchvision"``, ``"timm"``, a torchvision enum such as ``VGG16_Weights.DEFAULT``,
            ``"DEFAULT"`` or ``True`` (torchvision's), or a path to a
            ``.safetensors``/``.pth``/``.pt`` file in vggfeat, torchvision, timm or
            Caffe-converted layout.
        pretrained: timm's spelling: ``True`` is ``weights="DEFAULT"``.
        num_classes: outputs of fc8.  With weights of another class count, conv1_1 … fc7 are
            loaded and only fc8 is initialised anew (``init``, ``seed``); a
            :class:`NewHeadWarning` says so and ``weights_meta["new_head"]`` records it.
            0 leaves fc8 out: the net ends at fc7.
        batch_norm, width_mult, fc_dim, dropout: see :class:`VGG`.
        init: ``"paper"`` (N(0, 0.01²)), ``"glorot"`` or ``"kaiming"``; used without weights,
            and for a new fc8.
        seed: seed of the initialisation; ``weights="random"`` and a new fc8 on loaded weights
            default it to 0, so the same call gives the same net.
        init_from_a: a trained net A (model or weights path) whose conv1_1, conv2_1, conv3_1,
            conv3_2 and fc6–fc8 pre-initialise this net (Sect. 3.1).
        preprocessing: override the input normalisation the weights carry
            (``"paper"``, ``"imagenet"``, ``"caffe"``).
        download: allow fetching hub weights missing from the cache (also off when
            ``VGGFEAT_OFFLINE`` or ``HF_HUB_OFFLINE`` is set).
    """
    source, enum_arch = weights_source(weights, pretrained)
    if enum_arch is not None:
        arch = _same_arch(arch, enum_arch, f"weights={weights}")
    options = {"batch_norm": batch_norm, "width_mult": width_mult, "fc_dim": fc_dim}
    if source is None or source == "random":
        model = VGG(**_fresh_config(arch, num_classes, options), dropout=dropout)
        model.weights_meta = _initialise(model, init, seed=0 if source == "random" and seed is None
                                         else seed, init_from_a=init_from_a)
    else:
        loaded = (_hub_weights(source, arch, options, download=download, progress=progress)
                  if source in HUB_SOURCES else _file_weights(Path(source), arch, options))
        model = VGG(**loaded.config, dropout=dropout)
        converted, fmt = _fit(loaded, model)
        model.load_state_dict(converted)
        model.preprocessing = loaded.preprocessing or (CAFFE if fmt == "caffe" else IMAGENET)
        model.weights_meta = {**loaded.provenance, "layout": fmt}
        if num_classes is not None and num_classes != model.num_classes:
            _new_head(model, num_classes, init=init, seed=0 if seed is None else seed)
    if preprocessing is not None:
        model.preprocessing = get_preprocessing(preprocessing)
    return model


def weights_source(weights, pretrained: bool | None = None) -> tuple[str | None, str | None]:
    """Every accepted spelling of ``weights`` as ``None``, ``"random"``, a hub name or a path,
    with the arch a torchvision enum implies (else ``None``)."""
    if pretrained is not None:
        if weights is not None:
            raise ConfigError(f"pass weights= or pretrained=, not both (got weights={weights!r}, "
                              f"pretrained={pretrained!r})")
        weights = DEFAULT_SOURCE if pretrained else None
    if type(weights).__name__.endswith("_Weights") and hasattr(weights, "url"):
        return "torchvision", _enum_arch(weights)
    if weights is True or weights in ("DEFAULT", "IMAGENET1K_V1"):
        return DEFAULT_SOURCE, None
    if weights is False or weights is None:
        return None, None
    if not isinstance(weights, (str, os.PathLike)):
        raise ConfigError(f"weights must be 'torchvision', 'timm', 'random', 'DEFAULT', True, a "
                          f"torchvision enum such as VGG16_Weights.DEFAULT, or a file path; got "
                          f"{weights!r}")
    return str(weights), None


def _enum_arch(weights) -> str:
    """``VGG19_BN_Weights.IMAGENET1K_V1`` → ``vgg19_bn``, checked against the published files."""
    arch = type(weights).__name__.removesuffix("_Weights").lower()
    entry = pretrained_table().get((arch, "torchvision"))
    if entry is None:
        raise WeightsError(f"{weights} are not weights of a VGG vggfeat knows; use one of "
                           "VGG11/13/16/19(_BN)_Weights")
    if entry.location != weights.url:
        raise WeightsError(f"{weights} cannot build a whole VGG: torchvision publishes them for "
                           "the conv layers only (its classifier holds no values); use "
                           f"{type(weights).__name__}.IMAGENET1K_V1 (= .DEFAULT)")
    return arch


def _same_arch(arch: str | None, implied: str, what: str) -> str:
    if arch is not None and parse_arch(arch) != parse_arch(implied):
        raise ConfigError(f"{what} are for VGG {parse_arch(implied).name} ({implied}), not the "
                          f"requested {arch}; drop the arch or pick matching weights")
    return implied


def _fresh_config(arch: str | None, num_classes: int | None, options: dict) -> dict:
    spec = parse_arch(arch or "D", batch_norm=options["batch_norm"])
    return {"arch": spec.config, "batch_norm": spec.batch_norm,
            "num_classes": NUM_CLASSES if num_classes is None else num_classes,
            "width_mult": options["width_mult"] or 1.0, "fc_dim": options["fc_dim"] or FC_DIM}


def _initialise(model: VGG, init: str, *, seed: int | None, init_from_a) -> dict:
    """Initialise ``model`` in place; returns the provenance to record."""
    init_weights(model, init, seed=seed)
    provenance = {"source": "random", "init": init, "seed": seed}
    if init_from_a is not None:
        net_a = init_from_a if isinstance(init_from_a, VGG) else vgg("A", weights=init_from_a)
        if net_a.spec.config != "A":
            raise ConfigError(f"init_from_a must be a net A, got VGG {net_a.spec.name}")
        provenance["preinit_from_a"] = preinit_from_a(model, net_a) and net_a.weights_meta
    return provenance


def _hub_weights(source: str, arch: str | None, options: dict, *, download: bool,
                 progress: bool) -> _Weights:
    spec = parse_arch(arch or "D", batch_norm=options["batch_norm"])
    if (options["width_mult"] or 1.0, options["fc_dim"] or FC_DIM) != (1.0, FC_DIM):
        raise ConfigError(f"{source} weights are for the full-width net; drop width_mult/fc_dim "
                          "(--width-mult/--fc-dim), or use random weights (weights='random', "
                          "--weights random)")
    entry = pretrained_for(spec, source)
    path = fetch(entry, download=download, progress=progress)
    state_dict, _ = read_weights_file(path)
    config = {"arch": spec.config, "batch_norm": spec.batch_norm, "num_classes": NUM_CLASSES,
              "width_mult": 1.0, "fc_dim": FC_DIM}
    provenance = {"source": entry.source, "name": entry.location, "file": str(path),
                  "sha256": sha256(path), **entry.meta}
    return _Weights(state_dict, config, provenance, entry.preprocessing)


def _file_weights(path: Path, arch: str | None, options: dict) -> _Weights:
    """A weights file and the config it holds: recorded by vggfeat, else read from its shapes."""
    state_dict, meta = read_weights_file(path)
    recorded = meta.get("format") == FORMAT_TAG
    if recorded:
        config = _recorded_config(meta, path)
    else:
        try:
            config = infer_config(state_dict, prefer=arch)
        except ValueError as err:
            raise WeightsError(f"{path} is not a VGG state dict vggfeat can read: {err}") from err
    held = describe_config(config)
    if arch is not None:
        spec = parse_arch(arch, batch_norm=options["batch_norm"])
        if (spec.config, spec.batch_norm) != (config["arch"], config["batch_norm"]):
            raise WeightsError(f"{path} holds {held}, not the requested VGG {spec.name}; drop "
                               "the arch (the file says which config it is) or pick the "
                               "matching file")
    for key in ARCH_OPTIONS:
        if options[key] is not None and options[key] != config[key]:
            raise WeightsError(f"{path} holds {held}, made with {key}={config[key]}, not "
                               f"{options[key]}; drop {key} or pick the matching file")
    provenance = {"source": "file", "file": str(path.resolve()), "sha256": sha256(path)}
    if "meta" in meta:
        provenance = {**_metadata_entry(meta, "meta", path, json.loads, dict), **provenance}
    preprocessing = (_metadata_entry(meta, "preprocessing", path, Preprocessing.from_json,
                                     Preprocessing) if "preprocessing" in meta else None)
    return _Weights(state_dict, config, provenance, preprocessing, recorded)


def _rewrite_advice(path: Path) -> str:
    """What to do about a vggfeat file whose metadata is wrong (without metadata, vggfeat reads
    the config from the tensor shapes)."""
    return ("export the file again (vggfeat.save_weights), or copy its tensors without the "
            f"metadata (safetensors.torch.save_file(safetensors.torch.load_file('{path}'), "
            "'NEW.safetensors')) so that vggfeat reads the config from their shapes (the "
            "preprocessing is then ImageNet's unless you pass another)")


def _metadata_entry(meta: dict, key: str, path: Path, parse, kind: type):
    """``parse(meta[key])``, or a :class:`WeightsError` naming the file and the entry."""
    try:
        value = parse(meta[key])
        if not isinstance(value, kind):
            raise TypeError(f"a {type(value).__name__}, not a {kind.__name__}")
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # JSON of the wrong shape
        raise WeightsError(f"{path}: its vggfeat metadata entry '{key}' is not valid ({err}); "
                           f"{_rewrite_advice(path)}") from err
    return value


def _recorded_config(meta: dict, path: Path) -> dict:
    """The config a vggfeat file records: the :class:`VGG` arguments, all of them and no more."""
    def parse(text: str) -> dict:
        config = json.loads(text)
        if not isinstance(config, dict) or set(config) != {"arch", *ARCH_OPTIONS, "num_classes"}:
            raise ValueError(f"expected the keys arch, {', '.join(ARCH_OPTIONS)}, num_classes; "
                             f"got {text[:120]}")
        numbers = [config[k] for k in ("width_mult", "fc_dim", "num_classes")]
        if not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in numbers):
            raise ValueError(f"width_mult, fc_dim and num_classes must be numbers; got {numbers}")
        parse_arch(config["arch"], batch_norm=config["batch_norm"])
        return config

    return _metadata_entry(meta, "config", path, parse, dict)


def _fit(loaded: _Weights, model: VGG) -> tuple[dict, str]:
    """``to_vggfeat`` for loaded weights; a misfit names the file and what to do about it."""
    try:
        return to_vggfeat(loaded.state_dict, model)
    except InputError as err:
        file = loaded.provenance.get("file")
        if loaded.provenance.get("source") != "file":  # a hub file: damaged or replaced
            raise WeightsError(f"{file}: {err}; delete the file and run again to download it "
                               "anew") from err
        if not loaded.recorded:
            raise WeightsError(f"{file}: {err}") from err
        try:
            actual = f"are those of {describe_config(infer_config(loaded.state_dict))}"
        except ValueError:
            actual = "fit no VGG config"
        raise WeightsError(f"{file}: its metadata records {describe_config(loaded.config)}, but "
                           f"its tensors do not fit it ({err}); its tensors {actual}. The "
                           f"metadata is wrong: {_rewrite_advice(file)}") from err


def _new_head(model: VGG, num_classes: int, *, init: str, seed: int | None) -> None:
    """timm's pretrained body with a new classifier: fc8 only, initialised by ``init``."""
    had = model.num_classes
    model.reset_classifier(num_classes)
    init_weights(model.head.fc8, init, seed=seed)
    model.weights_meta["new_head"] = {"num_classes": num_classes, "replaced_classes": had,
                                      "init": init, "seed": seed}
    warnings.warn(f"VGG {model.spec.name}: conv1_1 … fc7 come from the weights "
                  f"({model.weights_meta.get('source')}, {had} classes); fc8 is new, initialised "
                  f"({init}, seed {seed}) for {num_classes} classes", NewHeadWarning, stacklevel=3)
