"""``vggfeat info``: Table 2 with exact figures, and the layers of a config with their shapes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..models.configs import CFGS, COMMON_NAMES
from .options import Arch

if TYPE_CHECKING:
    from ..models.vgg import VGG


def _meta_model(arch: str, batch_norm: bool = False) -> VGG:
    import torch

    from ..models import VGG

    with torch.device("meta"):  # shapes and counts only: no memory, no initialisation cost
        return VGG(arch, batch_norm=batch_norm)


@click.command("info")
@click.option("--arch", type=Arch(), default=None, help="also list this config's layers")
@click.option("--size", type=click.IntRange(224), default=224, show_default=True,
              help="input side in px for the layer shapes (dense mode above 224)")
def info_command(arch: str | None, size: int) -> None:
    """Weight layers, parameters and multiply-adds of every config (paper Table 2, exact)."""
    from ..models import count_macs, count_params, pretrained_table, weight_layers

    click.echo(f"{'config':<8}{'name':<11}{'weight layers':>14}{'parameters':>14}"
               f"{'MACs @224':>12}  pretrained")
    for config in CFGS:
        model = _meta_model(config)
        sources = sorted({src for (name, src) in pretrained_table() if name == COMMON_NAMES[config]})
        click.echo(f"{config:<8}{COMMON_NAMES[config]:<11}{weight_layers(model):>14}"
                   f"{count_params(model):>14,}{count_macs(model) / 1e9:>11.3f}G  "
                   f"{', '.join(sources) or '-'}")
    if arch is None:
        return
    model = _meta_model(arch)
    click.echo(f"\nVGG {model.spec.name}: layers and output shapes (C×H×W) for a {size}×{size} "
               "input; NAME is after the ReLU, NAME:pre before it")
    for name, shape in model.layer_shapes((size, size)).items():
        click.echo(f"  {name:<12} {'×'.join(map(str, shape))}")
    click.echo(f"  {'prob':<12} softmax of fc8 over classes")
