"""``vggfeat train``: a paper recipe on ImageNet (or any train/val class folders)."""

from __future__ import annotations

import shlex
from pathlib import Path

from typing import TYPE_CHECKING

import click

from .options import Arch, Device, IntList

if TYPE_CHECKING:
    from ..train import Recipe


def run_options(f):
    """The options of a training run, shared by ``vggfeat train`` and ``vggfeat localize train``."""
    options = [
        click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False),
                     help="YAML recipe, e.g. recipes/D-256.yaml; flags override its values"),
        click.option("--out", type=click.Path(file_okay=False), default=None,
                     help="run folder [default: runs/RECIPE-NAME]"),
        click.option("--arch", type=Arch(), default=None, help="A, A-LRN, B, C, D, E, vgg16 …"),
        click.option("--train-scale", type=IntList(), default=None,
                     help="S, or Smin,Smax for scale jittering (e.g. 256,512)"),
        click.option("--epochs", type=click.IntRange(1), default=None),
        click.option("--batch-size", type=click.IntRange(1), default=None,
                     help="global batch: the images one optimiser step sees (all processes "
                          "together)"),
        click.option("--micro-batch", type=click.IntRange(1), default=None,
                     help="images per forward pass per process; gradients are accumulated up to "
                          "the batch"),
        click.option("--init", type=click.Choice(["paper", "glorot", "kaiming"]), default=None),
        click.option("--width-mult", type=float, default=None,
                     help="reduced-width nets (quick runs)"),
        click.option("--fc-dim", type=int, default=None, help="width of fc6/fc7 (quick runs)"),
        click.option("--dropout", type=float, default=None),
        click.option("--val-limit", type=click.IntRange(1), default=None,
                     help="validate on this many images only"),
        click.option("--seed", type=int, default=None),
        click.option("--device", type=Device(), default=None,
                     help="cpu, cuda, cuda:1 … [default: cuda when available]"),
        click.option("--workers", type=click.IntRange(0), default=None,
                     help="decoding worker processes per process"),
        click.option("--amp", type=click.Choice(["bf16", "fp16", "fp32"]), default=None,
                     help="autocast dtype [default: bf16 on GPUs, fp32 on CPUs]"),
        click.option("--sync-bn/--no-sync-bn", default=None,
                     help="batch-norm nets on several GPUs: statistics over all GPUs' "
                          "micro-batches"),
        click.option("--compile/--no-compile", "compile_", default=None,
                     help="torch.compile the net"),
        click.option("--checkpoint-minutes", type=float, default=None,
                     help="write checkpoints/last.pt about this often (and at every "
                          "epoch's end) [default: 30]"),
        click.option("--resume", is_flag=True,
                     help="continue the run in --out from its last checkpoint, with its own "
                          "recipe unless --recipe is given (flags still override)"),
        click.option("--max-steps", type=click.IntRange(1), default=None,
                     help="stop after this many optimiser steps (a checkpoint is kept; --resume "
                          "goes on)"),
        click.option("--quiet", is_flag=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def recipe_from_flags(cls: type[Recipe], recipe_file: str | None, out: str | None, resume: bool,
                      train_scale: tuple[int, ...] | None, compile_: bool | None,
                      **overrides) -> Recipe:
    """The recipe file (or the resumed run's recipe, or the defaults of ``cls``), with the flags
    that were given on top."""
    from ..train import load_recipe, load_run_recipe

    if recipe_file:
        recipe = load_recipe(recipe_file, cls)
    elif resume:
        if out is None:
            raise click.UsageError("--resume needs --out, the run folder to continue")
        recipe = load_run_recipe(out, cls)
    else:
        recipe = cls()
    if train_scale is not None:
        train_scale = train_scale[0] if len(train_scale) == 1 else list(train_scale)
    return recipe.with_overrides(train_scale=train_scale, compile=compile_, **overrides)


@click.command("train")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="folder with train/ and val/ (ImageNet layout, or one sub-folder per class)")
@run_options
@click.option("--lr", type=float, default=None,
              help="learning rate for a batch of 256 images, scaled linearly to --batch-size "
                   "[default: 0.01, or 0.001 with --weights]")
@click.option("--weights", default=None,
              help="fine-tune: torchvision, timm or a weights file; conv1_1 … fc7 come from it and "
                   "fc8 is new when the classes differ")
@click.option("--freeze", default=None,
              help="with --weights: none, conv (train fc6–fc8), or a layer such as conv4_3 or fc7 "
                   "(it and all before it stay fixed) [default: none]")
@click.option("--init-from-a", default=None, help="pre-initialise from a trained net A")
@click.option("--devkit", type=click.Path(exists=True, file_okay=False),
              help="ILSVRC2012_devkit_t12, for a flat val folder")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False),
              help="filename,wnid CSV, for a flat val folder")
def train_command(data, recipe_file, out, arch, train_scale, epochs, batch_size, micro_batch, lr,
                  weights, freeze, init_from_a, init, width_mult, fc_dim, dropout, val_limit, seed,
                  device, workers, amp, sync_bn, compile_, checkpoint_minutes, devkit, labels,
                  resume, max_steps, quiet) -> None:
    """Train a VGG as in Sect. 3.1: SGD with momentum, lr divided by 10 on plateaus, scale
    jittering, random crops and flips, PCA colour shift.

    Runs on one device, or on several with torchrun (e.g. torchrun --nproc-per-node 8 -m vggfeat
    train …).  Kill it at any moment; --resume continues from the last checkpoint.
    """
    from ..train import Recipe, train

    recipe = recipe_from_flags(
        Recipe, recipe_file, out, resume, train_scale, compile_, arch=arch, epochs=epochs,
        batch_size=batch_size, micro_batch=micro_batch, lr=lr, weights=weights, freeze=freeze,
        init_from_a=init_from_a, init=init, width_mult=width_mult, fc_dim=fc_dim, dropout=dropout,
        val_limit=val_limit, seed=seed, workers=workers, amp=amp, sync_bn=sync_bn,
        checkpoint_minutes=checkpoint_minutes)
    result = train(recipe, data, out or f"runs/{recipe.name}", device=device,
                   resume=resume, devkit=devkit, labels_csv=labels, max_steps=max_steps,
                   progress=not quiet)
    report_run(result, quiet, lambda row: f"val top-1 error {row['val_top1_error']:.2f}%, "
                                          f"top-5 {row['val_top5_error']:.2f}%",
               max_steps=max_steps, data=data)


def report_run(result, quiet: bool, describe, *, max_steps: int | None, data: str,
               resume_options: str = "") -> None:
    """The end of a training run on stderr: ``describe(last history row)``, the exported
    weights or, when ``--max-steps`` stopped it, how to go on; the images that were skipped."""
    if result.history and not quiet:
        last = result.history[-1]
        click.echo(f"epoch {last['epoch']}: {describe(last)}", err=True)
    if result.final:
        click.echo(f"weights: {result.final}", err=True)
    elif max_steps is not None:
        again = (f"{click.get_current_context().command_path} --resume --data "
                 f"{shlex.quote(str(data))}{resume_options} --out "
                 f"{shlex.quote(str(result.run_dir))}")
        click.echo(f"stopped after {result.global_step} steps, as asked by --max-steps "
                   f"{max_steps}; the checkpoint is in {result.run_dir}; continue with: {again}",
                   err=True)
    if result.skipped:
        # Images are skipped for more than unreadable files (a box outside its image, …):
        # show a reason, not a guess at one.
        example = next((line.split("\t", 1) for tsv in
                        sorted(Path(result.run_dir).glob("skipped-rank*.tsv"))
                        for line in tsv.read_text().splitlines() if "\t" in line), None)
        reason = "" if example is None else \
            f", e.g. {example[1] if example[0] in example[1] else ': '.join(example)}"
        click.echo(f"{result.skipped} training image(s) skipped{reason} (each with its reason "
                   f"in {result.run_dir}/skipped-rank*.tsv)", err=True)
