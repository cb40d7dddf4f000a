"""``vggfeat localize train|evaluate|score``: box-regression nets of the paper's Appendix A."""

from __future__ import annotations

import shlex
from pathlib import Path

import click

from ..choices import DEFAULT_LOC_CLASSIFIER, LOC_CLASSIFIER_METHODS, LOC_METHODS, MERGE_THRESHOLD
from .options import IntList, backend_option, device_options
from .train import recipe_from_flags, report_run, run_options


def _report_bad_boxes(table) -> None:
    # Warnings about the data show even with --quiet, which hides the progress bars only.
    if table.bad:
        for source, reason in table.bad[:10]:
            click.echo(f"bad box dropped: {source}: {reason}", err=True)
        if len(table.bad) > 10:
            click.echo(f"… and {len(table.bad) - 10} more bad boxes", err=True)


@click.group("localize")
def localize_group() -> None:
    """Localisation as in the paper's Appendix A: train box-regression nets (SCR/PCR), run them
    with the centre-crop or dense protocol, score LOC submission files."""


@localize_group.command("train")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="folder with train/ (one sub-folder per class) and val/ (flat or in class "
                   "folders), as for vggfeat train")
@click.option("--boxes", "boxes_paths", multiple=True, required=True, type=click.Path(exists=True),
              help="LOC_train_solution.csv / LOC_val_solution.csv or ILSVRC bbox XML folders; "
                   "repeat for train and val")
@click.option("--weights", default=None,
              help="classification net to start from (vggfeat file, torchvision or timm): every "
                   "layer but fc8")
@click.option("--head", type=click.Choice(["scr", "pcr"]), default=None,
              help="single-class (4 outputs) or per-class (4 per class) regression [default: pcr]")
@click.option("--finetune", type=click.Choice(["fc", "all"]), default=None,
              help="train fc6–fc8 only, or every layer [default: all]")
@click.option("--lr", type=float, default=None,
              help="learning rate for a batch of 256 images, scaled linearly to --batch-size "
                   "[default: 0.001]")
@run_options
def train_command(data, boxes_paths, weights, head, finetune, lr, recipe_file, out, arch,
                  train_scale, epochs, batch_size, micro_batch, init, width_mult, fc_dim, dropout,
                  val_limit, seed, device, workers, amp, sync_bn, compile_, checkpoint_minutes,
                  resume, max_steps, quiet) -> None:
    """Train a localisation net (Appendix A): a classification net whose fc8 regresses boxes,
    Euclidean loss, lr 10⁻³, the training augmentation of vggfeat train applied to image and box.

    Everything vggfeat train guarantees holds: torchrun/DDP, bf16, exact resume after a kill,
    metrics.csv, curves.png, TensorBoard, .safetensors exports (which record the box head).
    """
    from ..localize.train import Localization, LocRecipe, merged_boxes
    from ..train import train

    recipe = recipe_from_flags(
        LocRecipe, recipe_file, out, resume, train_scale, compile_, weights=weights, head=head,
        finetune=finetune, lr=lr, arch=arch, epochs=epochs, batch_size=batch_size,
        micro_batch=micro_batch, init=init, width_mult=width_mult, fc_dim=fc_dim,
        dropout=dropout, val_limit=val_limit, seed=seed, workers=workers, amp=amp,
        sync_bn=sync_bn, checkpoint_minutes=checkpoint_minutes)
    table = merged_boxes(boxes_paths)
    _report_bad_boxes(table)
    task = Localization.from_folders(data, table, head=recipe.head)
    click.echo(f"box layer fc8: {task.head.describe()}"
               + (", the classes with training boxes" if task.head.kind == "pcr" else ""),
               err=True)
    if task.without_boxes:
        click.echo(f"{task.without_boxes} training images have no box and are left out; "
                   f"training on {len(task.train_set)}", err=True)
    result = train(recipe, task, out or f"runs/{recipe.name}", device=device, resume=resume,
                   max_steps=max_steps, progress=not quiet)
    report_run(result, quiet, lambda row: "val localisation error (centre crop, true class) "
                                          f"{row['val_loc_error']:.2f}%", max_steps=max_steps,
               data=data, resume_options="".join(f" --boxes {shlex.quote(str(b))}"
                                                 for b in boxes_paths))


@localize_group.command("evaluate")
@click.option("--weights", "loc_weights", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="localisation net weights (repeat --weights to merge several nets' boxes)")
@click.option("--cls-weights", "cls_weights", multiple=True,
              help="classification net for the dense protocol's class scores, as "
                   "WEIGHTS[@METHOD][@Q,Q,…]: WEIGHTS torchvision, timm, a file or random; "
                   f"METHOD {', '.join(LOC_CLASSIFIER_METHODS[:-1])} or {LOC_CLASSIFIER_METHODS[-1]}; Q "
                   "as vggfeat evaluate's default. Repeat it to fuse several nets, e.g. "
                   "D.safetensors@dense+multi-crop --cls-weights E.safetensors@dense+multi-crop "
                   f"(the paper's best system) [default: {DEFAULT_LOC_CLASSIFIER}]")
@click.option("--data", required=True, type=click.Path(exists=True, file_okay=False),
              help="folder with val/ (flat images, or one sub-folder per class)")
@click.option("--boxes", "boxes_path", required=True, type=click.Path(exists=True),
              help="LOC_val_solution.csv, or the folder of ILSVRC val bbox XML files")
@click.option("--method", type=click.Choice(LOC_METHODS), default="dense",
              show_default=True)
@click.option("--scales", type=IntList(), default=None,
              help="test scales Q of every localisation net [default: each net's own: the "
                   "test_scales its recipe records, else its training S; else 256 (center-crop) "
                   "or 384]")
@click.option("--merge-threshold", type=float, default=MERGE_THRESHOLD, show_default=True,
              help="greedy merge: merge boxes whose match score is below this")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the summary here")
@click.option("--predictions", type=click.Path(dir_okay=False),
              help="write a LOC submission CSV (ImageId,PredictionString) here")
@click.option("--pictures", type=click.Path(file_okay=False),
              help="draw the predicted and true boxes on each image into this folder")
@device_options
@click.option("--amp", type=click.Choice(["bf16", "fp16"]), default=None)
@backend_option
@click.option("--quiet", is_flag=True)
def evaluate_command(loc_weights, cls_weights, data, boxes_path, method, scales, merge_threshold,
                     json_out, predictions, pictures, batch_size, workers, device, amp, backend,
                     quiet) -> None:
    """Localisation error on val images with known boxes: center-crop with the ground-truth
    class (Table 8), or dense with the top-5 classes and greedy merging (Tables 9–10)."""
    from contextlib import ExitStack

    from ..cache.lock import OutputLock
    from ..data.boxes import read_boxes
    from ..errors import InputError
    from ..localize.predict import Localizer, classification_nets
    from ..localize.run import (
        draw_all,
        evaluate_localization,
        images_with_boxes,
        write_predictions,
        write_summary,
    )

    if predictions and json_out and Path(predictions).resolve() == Path(json_out).resolve():
        raise InputError(f"--json and --predictions both name {json_out}; give each its own "
                         "file")
    cls_weights = classification_nets(method, cls_weights)
    outputs = [p for p in (predictions, json_out) if p]
    with ExitStack() as held:
        # One run per output: a second one writing the same file stops here, naming the first.
        for path in {Path(p).resolve(): p for p in outputs}.values():
            held.enter_context(OutputLock(path))
        table = read_boxes(boxes_path)
        _report_bad_boxes(table)
        images = images_with_boxes(Path(data) / "val", table)
        if images.without_boxes:
            click.echo(f"{len(images.without_boxes)} image(s) without boxes left out, e.g. "
                       f"{images.without_boxes[0]}", err=True)
        localizer = Localizer.from_weights(
            list(loc_weights), cls_weights, method=method, scales=scales,
            merge_threshold=merge_threshold, device=device,
            batch_size=batch_size, amp=amp, backend=backend)
        # Finished images are kept beside the output as the run goes: run the same command
        # again after a kill and it goes on where it stopped.
        journal = Path(f"{outputs[0]}.partial.jsonl") if outputs else None
        result = evaluate_localization(localizer, images, batch_size=batch_size,
                                       workers=workers, progress=not quiet, journal=journal)
        _report_unscored(result)
        weights = {"weights": list(loc_weights), "cls_weights": cls_weights,
                   "backend": localizer.locs[0].backend}
        if json_out:
            write_summary(result, json_out, **weights)
        if predictions:
            write_predictions(result, predictions)
        if pictures:
            draw_all(result, images, pictures)
        if journal is not None:
            journal.unlink()
    errors = ", ".join(f"{k} {v:.2f}%" for k, v in result.metrics.items())
    scales = " + ".join(",".join(map(str, qs)) for qs in localizer.net_scales)
    click.echo(f"{method} Q={scales} on {len(result.paths)} images: {errors} (images per forward: "
               f"{result.images_per_forward:.1f}, backend: {localizer.locs[0].backend})")


def _report_unscored(result) -> None:
    """The images a localisation run skipped, left out, or could not guess, on stderr."""
    for path, reason in result.failed:
        click.echo(f"skipped {path}: {reason}", err=True)
    if result.other_classes:
        click.echo(f"{len(result.other_classes)} image(s) of classes the localisation net(s) "
                   f"do not box are not scored, e.g. {result.other_classes[0]}", err=True)
    empty = [p for p, guesses in zip(result.paths, result.guesses) if not guesses]
    if empty:
        click.echo(f"{len(empty)} image(s) got no guess (an empty prediction, scored as "
                   f"wrong), e.g. {empty[0]}", err=True)


@localize_group.command("score")
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False))
@click.option("--boxes", "boxes_path", required=True, type=click.Path(exists=True),
              help="the ground truth: LOC_val_solution.csv or the folder of val bbox XML files")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the summary here")
def score_command(predictions, boxes_path, json_out) -> None:
    """Top-1/top-5 localisation error of a LOC submission file (ImageId,PredictionString with up
    to 5 ranked 'wnid xmin ymin xmax ymax' groups per image)."""
    from ..data.boxes import read_boxes
    from ..fileio import write_json_atomic
    from ..localize.metric import score_submission

    score = score_submission(read_boxes(predictions, ordered=True), read_boxes(boxes_path))
    if json_out:
        write_json_atomic(json_out, {**score.summary(), "predictions": str(predictions)})
    missing = f" ({score.missing} images without a prediction count as errors)" \
        if score.missing else ""
    click.echo(f"top-1 localisation error {score.top1_loc_error:.2f}%, top-5 "
               f"{score.top5_loc_error:.2f}% on {score.images} images{missing}")
