"""Training recipes: the paper's Sect. 3.1 settings as a readable YAML file per table row.

A recipe file holds any subset of the :class:`Recipe` fields; the rest take the paper's values.
Command-line flags override the file.  Unknown keys are errors (a typo must not silently fall
back to a default during a two-week run).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from typing import ClassVar
from pathlib import Path

import yaml

from ..errors import RecipeError
from ..fileio import write_text_atomic
from ..models.configs import parse_arch
from ..models.init import SCHEMES as INIT_SCHEMES
from ..models.preprocessing import PRESETS


@dataclass(frozen=True)
class Recipe:
    """Everything that defines a training run.

    Attributes:
        name: the run's name (e.g. ``D-256``); ``table_row``: the paper row it reproduces.
        arch: VGG config or alias; ``batch_norm``, ``width_mult``, ``fc_dim``: as :func:`vgg`.
            None: what ``weights`` hold, else D, no batch norm, full width, 4096.  A run records
            the values of the net it trained (a weights file's own config); given values that
            contradict a weights file are refused.
        train_scale: S in px (smallest side after rescaling), or ``[Smin, Smax]`` for scale
            jittering, S drawn per image.
        init: ``paper`` (N(0, 0.01²)), ``glorot`` or ``kaiming``, for layers not taken from
            ``init_from_a`` (a trained net A: conv1_1, conv2_1, conv3_1, conv3_2, fc6–fc8) or from
            ``weights`` (a whole net to fine-tune, e.g. the S=256 model for S=384).
        epochs, batch_size (global, one optimiser step), momentum, weight_decay, dropout.
        lr: the learning rate for a global batch of ``lr_base_size`` images (256, the paper's
            batch); the run uses lr × batch_size / lr_base_size (linear scaling, timm's
            ``lr_base``), so a quick run with a small batch does not take the paper's step.
            None: 10⁻², or 10⁻³ when starting from ``weights`` (the paper's fine-tuning rate).
            ``lr_base_size: null`` takes ``lr`` as it is, whatever the batch.
        lr_factor, lr_drops, patience: the learning rate is multiplied by ``lr_factor`` when the
            validation top-1 error has not improved for ``patience`` epochs, at most ``lr_drops``
            times.
        crop (px), flip, lighting (std of the AlexNet PCA colour shift; 0 turns it off),
            preprocessing (``paper`` mean-RGB subtraction, ``imagenet``, ``caffe``; None: the
            one ``weights`` carry, else ``paper``).
        val_method, val_scale: per-epoch validation (``center-crop`` or ``dense``) at Q =
            ``val_scale`` (default S, or 384 for jittered S); ``val_limit``: use only that many
            validation images (quick runs).
        micro_batch: images per forward pass per process; the global batch is reached by
            gradient accumulation (None: the whole per-process share at once).
        amp, channels_last, compile, workers: engineering settings that do not change the maths
            (amp None: bf16 autocast on GPUs, float32 elsewhere; ``fp32`` turns autocast off.
            channels_last None: on for GPUs, where it is faster; off on CPUs, where training
            measured 20% slower with it).
        sync_bn: with ``batch_norm`` on several GPUs, normalise with statistics over every
            process's micro-batch (SyncBatchNorm); off, each process uses its own micro-batch's
            statistics, as torchvision's and timm's reference scripts do by default.
        checkpoint_minutes, checkpoint_steps: write ``last.pt`` this often within an epoch.
    """

    name: str = "run"
    table_row: str = ""
    arch: str | None = None
    batch_norm: bool | None = None
    width_mult: float | None = None
    fc_dim: int | None = None
    train_scale: int | tuple[int, int] = 256
    init: str = "glorot"
    init_from_a: str | None = None
    weights: str | None = None
    freeze: str = "none"  # fine-tuning: "none", "conv" or a layer name (vggfeat.models.freeze)
    epochs: int = 74
    batch_size: int = 256
    lr: float | None = None
    lr_base_size: int | None = 256
    momentum: float = 0.9
    weight_decay: float = 5e-4
    dropout: float = 0.5
    lr_factor: float = 0.1
    lr_drops: int = 3
    patience: int = 2
    crop: int = 224
    flip: bool = True
    lighting: float = 0.1
    preprocessing: str | None = None
    val_method: str = "center-crop"
    val_scale: int | None = None
    val_limit: int | None = None
    seed: int = 0
    micro_batch: int | None = None
    amp: str | None = None
    sync_bn: bool = False
    channels_last: bool | None = None
    compile: bool = False
    workers: int | None = None
    checkpoint_minutes: float = 30.0
    checkpoint_steps: int | None = None
    notes: list[str] = field(default_factory=list)

    # Fields that change the maths: resuming a run with other values is refused.  Subclasses
    # for other tasks extend it.
    resume_fixed: ClassVar[tuple[str, ...]] = (
        "arch", "batch_norm", "width_mult", "fc_dim", "train_scale", "init", "init_from_a",
        "weights", "freeze", "batch_size", "lr", "lr_base_size", "momentum", "weight_decay", "dropout",
        "lr_factor", "lr_drops", "patience", "crop", "flip", "lighting", "preprocessing", "seed",
        "sync_bn")

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
            if self.arch is not None:
                parse_arch(self.arch)
        except ValueError as err:
            raise RecipeError(str(err)) from err
        checks = {"init": (self.init, INIT_SCHEMES),
                  "preprocessing": (self.preprocessing, (None, *PRESETS)),
                  "val_method": (self.val_method, ("center-crop", "dense")),
                  "amp": (self.amp, (None, "fp32", "bf16", "fp16"))}
        for key, (value, allowed) in checks.items():
            if value not in allowed:
                raise RecipeError(f"{key} must be one of {', '.join(map(str, allowed))}; got "
                                  f"{value!r}")
        for key in ("epochs", "batch_size", "lr_drops", "crop", "lr_base_size", "micro_batch",
                    "fc_dim", "checkpoint_steps", "val_limit", "val_scale"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, int) and value >= 1):
                raise RecipeError(f"{key} must be a whole number ≥ 1, got {value!r}")
        # (value, lowest allowed, lowest included, above the highest): a NaN or infinite lr
        # would otherwise only show up as a NaN loss, hours into the run.
        ranges = {"lr": (self.base_lr, 0, False, math.inf),
                  "momentum": (self.momentum, 0, True, 1), "dropout": (self.dropout, 0, True, 1),
                  "weight_decay": (self.weight_decay, 0, True, math.inf),
                  "lr_factor": (self.lr_factor, 0, False, 1),
                  "lighting": (self.lighting, 0, True, math.inf),
                  "width_mult": (1.0 if self.width_mult is None else self.width_mult, 0, False, math.inf),
                  "checkpoint_minutes": (self.checkpoint_minutes, 0, False, math.inf)}
        for key, (value, low, closed, high) in ranges.items():
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
                math.isfinite(value) and (value >= low if closed else value > low) and value < high
            if not ok:
                bracket = "[" if closed else "("
                raise RecipeError(f"{key} must be a finite number in {bracket}{low}, {high}), got "
                                  f"{value!r}")
        if self.patience < 0:
            raise RecipeError(f"patience must be ≥ 0 epochs, got {self.patience}")

    @property
    def base_lr(self) -> float:
        """lr for a batch of ``lr_base_size`` images: the given one, or the paper's default."""
        if self.lr is not None:
            return self.lr
        return 1e-3 if self.weights else 1e-2

    @property
    def scaled_lr(self) -> float:
        """The lr the run uses: ``base_lr`` × batch_size / lr_base_size (linear scaling)."""
        if self.lr_base_size is None:
            return self.base_lr
        return self.base_lr * self.batch_size / self.lr_base_size

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
        return _build(type(self), self.to_dict(),
                      {k: v for k, v in overrides.items() if v is not None}, "command line")


def _build(cls: type[Recipe], base: dict, changes: dict, where: str) -> Recipe:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise RecipeError(f"{where}: unknown recipe key(s) {', '.join(unknown)}; known keys: "
                          f"{', '.join(sorted(known))}")
    try:
        return replace(cls(**base), **changes)
    except TypeError as err:
        raise RecipeError(f"{where}: {err}") from err
    except RecipeError as err:
        raise RecipeError(f"{where}: {err}") from err


def load_recipe(path: str | os.PathLike, cls: type[Recipe] = Recipe) -> Recipe:
    """Read a YAML recipe (as ``cls``, a :class:`Recipe` subclass for other tasks); relative
    weight paths in it are taken from the working directory."""
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
    return _build(cls, {}, data, str(path))


def load_run_recipe(run_dir: str | os.PathLike, cls: type[Recipe] = Recipe) -> Recipe:
    """Read the recipe a run folder was started with (its ``recipe.yaml``)."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise RecipeError(f"{path} does not exist: --resume without --recipe continues a run in "
                          "--out, and that folder holds none; check --out")
    return load_recipe(path, cls)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    write_text_atomic(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
