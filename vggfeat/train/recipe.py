"""Training recipes: the paper's Sect. 3.1 settings as a readable YAML file per table row.

A recipe file holds any subset of the :class:`Recipe` fields; the rest take the paper's values.
Command-line flags override the file.  Unknown keys are errors (a typo must not silently fall
back to a default during a two-week run).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from ..errors import RecipeError
from ..models.configs import parse_arch
from ..models.init import SCHEMES as INIT_SCHEMES
from ..models.preprocessing import PRESETS


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a training run.

    Attributes:
        name: the run's name (e.g. ``D-256``); ``table_row``: the paper row it reproduces.
        arch: VGG config or alias; ``batch_norm``, ``width_mult``, ``fc_dim``: as :func:`vgg`.
        train_scale: S in px (smallest side after rescaling), or ``[Smin, Smax]`` for scale
            jittering, S drawn per image.
        init: ``paper`` (N(0, 0.01²)), ``glorot`` or ``kaiming``, for layers not taken from
            ``init_from_a`` (a trained net A: conv1_1, conv2_1, conv3_1, conv3_2, fc6–fc8) or from
            ``weights`` (a whole net to fine-tune, e.g. the S=256 model for S=384).
        epochs, batch_size (global, one optimiser step), lr, momentum, weight_decay, dropout.
        lr_factor, lr_drops, patience: the learning rate is multiplied by ``lr_factor`` when the
            validation top-1 error has not improved for ``patience`` epochs, at most ``lr_drops``
            times.
        crop (px), flip, lighting (std of the AlexNet PCA colour shift; 0 turns it off),
            preprocessing (``paper`` mean-RGB subtraction, ``imagenet``, ``caffe``).
        val_method, val_scale: per-epoch validation (``center-crop`` or ``dense``) at Q =
            ``val_scale`` (default S, or 384 for jittered S); ``val_limit``: use only that many
            validation images (quick runs).
        micro_batch: images per forward pass per process; the global batch is reached by
            gradient accumulation (None: the whole per-process share at once).
        amp, channels_last, compile, workers: engineering settings that do not change the maths
            (channels_last None: on for GPUs, where it is faster; off on CPUs, where training
            measured 20% slower with it).
        checkpoint_minutes, checkpoint_steps: write ``last.pt`` this often within an epoch.
    """

    name: str = "run"
    table_row: str = ""
    arch: str = "D"
    batch_norm: bool = False
    width_mult: float = 1.0
    fc_dim: int = 4096
    train_scale: int | tuple[int, int] = 256
    init: str = "glorot"
    init_from_a: str | None = None
    weights: str | None = None
    epochs: int = 74
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dropout: float = 0.5
    lr_factor: float = 0.1
    lr_drops: int = 3
    patience: int = 2
    crop: int = 224
    flip: bool = True
    lighting: float = 0.1
    preprocessing: str = "paper"
    val_method: str = "center-crop"
    val_scale: int | None = None
    val_limit: int | None = None
    seed: int = 0
    micro_batch: int | None = None
    amp: str | None = None
    channels_last: bool | None = None
    compile: bool = False
    workers: int | None = None
    checkpoint_minutes: float = 30.0
    checkpoint_steps: int | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        scale = self.train_scale
        if isinstance(scale, (list, tuple)):
            if len(scale) != 2 or not scale[0] < scale[1]:
                raise RecipeError(f"train_scale must be S or [Smin, Smax] with Smin < Smax, got "
                                  f"{list(scale)}")
            object.__setattr__(self, "train_scale", (int(scale[0]), int(scale[1])))
        if min(self.scale_range) < self.crop:
            raise RecipeError(f"train_scale {self.train_scale} is smaller than the {self.crop} px "
                              "crop: the smallest side must be at least the crop size")
        try:
            parse_arch(self.arch)
        except ValueError as err:
            raise RecipeError(str(err)) from err
        checks = {"init": (self.init, INIT_SCHEMES), "preprocessing": (self.preprocessing, PRESETS),
                  "val_method": (self.val_method, ("center-crop", "dense")),
                  "amp": (self.amp, (None, "bf16", "fp16"))}
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise RecipeError(f"{key} must be one of {', '.join(map(str, allowed))}; got "
                                  f"{value!r}")
        for key in ("epochs", "batch_size", "lr_drops", "crop"):
            if getattr(self, key) < 1:
                raise RecipeError(f"{key} must be ≥ 1, got {getattr(self, key)}")
        if not self.lr > 0 or not 0 <= self.dropout < 1 or not 0 < self.lr_factor < 1:
            raise RecipeError("need lr > 0, 0 ≤ dropout < 1 and 0 < lr_factor < 1; got "
                              f"lr={self.lr}, dropout={self.dropout}, lr_factor={self.lr_factor}")

    @property
    def scale_range(self) -> tuple[int, int]:
        """(Smin, Smax) in px; equal for a fixed S."""
        s = self.train_scale
        return (s, s) if isinstance(s, int) else s

    @property
    def scale_label(self) -> str:
        """"256" or "256-512", as the evaluation reads ``train_scale`` from weight files."""
        lo, hi = self.scale_range
        return str(lo) if lo == hi else f"{lo}-{hi}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train_scale"] = list(self.train_scale) if isinstance(self.train_scale, tuple) \
            else self.train_scale
        return d

    def with_overrides(self, **overrides) -> Recipe:
        """A copy with the given fields changed (None values are ignored)."""
        return _build(self.to_dict(), {k: v for k, v in overrides.items() if v is not None},
                      "command line")


def _build(base: dict, changes: dict, where: str) -> Recipe:
    known = {f.name for f in fields(Recipe)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown recipe key(s) {', '.join(unknown)}; known keys: "
                          f"{', '.join(sorted(known))}")
    try:
        return replace(Recipe(**base), **changes)
    except TypeError as err:
        raise RecipeError(f"{where}: {err}") from err
    except RecipeError as err:
        raise RecipeError(f"{where}: {err}") from err


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read a YAML recipe; relative weight paths in it are taken from the working directory."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} does not exist (recipes/ holds one file per paper row)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of key: value lines")
    data.setdefault("name", path.stem)
    return _build({}, data, str(path))


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
