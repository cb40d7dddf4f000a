"""The net, optimiser and lr schedule a recipe starts from."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..models.factory import vgg
from ..models.finetune import freeze
from ..models.vgg import VGG
from .recipe import Recipe


def build_model(recipe: Recipe, num_classes: int, *, download: bool = True) -> VGG:
    """The net a recipe starts from: fresh (``init``), pre-initialised from A, or ``weights``.

    ``preprocessing: null`` keeps what ``weights`` carry (torchvision's and timm's want
    ``imagenet``); a fresh net gets the paper's mean-RGB subtraction.
    """
    preprocessing = recipe.preprocessing or (None if recipe.weights else "paper")
    # Unset fields (None) take what the weights hold; set ones that contradict them are refused.
    model = vgg(recipe.arch, weights=recipe.weights, num_classes=num_classes,
                batch_norm=recipe.batch_norm, width_mult=recipe.width_mult, fc_dim=recipe.fc_dim,
                dropout=recipe.dropout, init=recipe.init, seed=recipe.seed,
                init_from_a=recipe.init_from_a, preprocessing=preprocessing, download=download)
    freeze(model, recipe.freeze)
    return model


def recipe_for_net(recipe: Recipe, model: VGG) -> Recipe:
    """``recipe`` with the config fields it left unset (None) filled from the net it built: what
    a run records, e.g. a weights file's own arch, batch_norm, width_mult and fc_dim."""
    unset = {k: model.config[k] for k in ("arch", "batch_norm", "width_mult", "fc_dim")
             if getattr(recipe, k) is None}
    return replace(recipe, **unset)


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.SGD:
    """SGD with momentum at ``recipe.scaled_lr``; weight decay on weights, not on biases and
    batch-norm parameters.  Frozen parameters (``requires_grad=False``) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=recipe.scaled_lr, momentum=recipe.momentum)


def make_scheduler(optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """lr × ``lr_factor`` when the validation error stalls for ``patience`` epochs, at most
    ``lr_drops`` times (the floor sits just below the last allowed value)."""
    floor = recipe.scaled_lr * recipe.lr_factor ** recipe.lr_drops
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=recipe.lr_factor, patience=recipe.patience,
        min_lr=floor * (1 - 1e-6), eps=floor * 1e-3)
