"""``vggfeat transfer``: the paper's linear-classifier protocols on cached descriptors."""

from __future__ import annotations

import click

from ..choices import CLASSIFIERS, DENSE_SCALES, PROTOCOLS, VOC_SCALES
from .options import (
    FloatList,
    IntList,
    backend_option,
    check_layer_option,
    device_options,
    model_options,
)


def _q(scales: tuple[int, ...]) -> str:
    return ",".join(map(str, scales))


@click.command("transfer")
@click.argument("features", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--protocol", type=click.Choice(PROTOCOLS), required=True,
              help="voc2007, voc2012, voc2012-action (Table 12), caltech101, caltech256, or "
                   "folder (one folder per class)")
@click.option("--data", type=click.Path(exists=True, file_okay=False),
              help="dataset root in its official layout (needed for VOC); a FEATURES file that "
                   "does not exist yet is extracted from it first")
@click.option("--classifier", type=click.Choice(CLASSIFIERS), default="svm", show_default=True,
              help="linear SVM (the paper's) or multinomial logistic regression")
@click.option("--aggregate", type=click.Choice(["mean", "stack", "both"]), default=None,
              help="combine scales by averaging or stacking, or report both [default: the "
                   "paper's choice (VOC mean, Caltech stack) where the file allows, else as stored]")
@click.option("--splits", type=click.IntRange(1), default=None,
              help="random splits [default: 3 for Caltech and folders]")
@click.option("--train-per-class", type=click.IntRange(1), default=None,
              help="training images per class [default: Caltech-101 30, Caltech-256 60; folders: "
                   "75% of each class]")
@click.option("--test-per-class", type=click.IntRange(1), default=None,
              help="at most this many test images per class [default: Caltech-101 50, else all]")
@click.option("--C", "C_grid", type=FloatList(), default=None,
              help="values of C to choose from on held-out data [default: 0.01…100 for svm, "
                   "0.1…10⁴ for logreg]")
@click.option("--setting", type=click.Choice(["image", "image+box", "both"]), default=None,
              help="voc2012-action: describe a person by the whole image, or by the whole image "
                   "and the person box stacked [default: both, as Table 12]")
@click.option("--crops", type=click.Path(file_okay=False), default=None,
              help="voc2012-action: folder for the person-box images [default: "
                   "VOC2012/PersonCrops]")
@click.option("--seed", type=int, default=0, show_default=True, help="split s uses seed + s")
@click.option("--report", type=click.Path(dir_okay=False),
              help="write REPORT.md, REPORT.json and REPORT.splits.json")
@model_options
@click.option("--layer", default="fc7", show_default=True, help="layer, when extracting")
@click.option("--scales", type=IntList(), default=None,
              help="Q values, when extracting (stored stacked, so mean and stack both work) "
                   f"[default: the paper's: VOC {_q(VOC_SCALES)}; others {_q(DENSE_SCALES)}]")
@device_options
@click.option("--amp", type=click.Choice(["bf16", "fp16"]), default=None)
@backend_option
@click.option("--quiet", is_flag=True)
def transfer_command(features, protocol, data, classifier, aggregate, splits, train_per_class,
                     test_per_class, C_grid, setting, crops, seed, report, arch, weights,
                     layer, scales,
                     batch_size, workers, device, amp, backend, quiet) -> None:
    """Train linear classifiers on the descriptors in FEATURES and score them as the paper did.

    Give two FEATURES files (e.g. of nets D and E) to stack their descriptors.  The results are
    printed as a Markdown table beside the paper's Table 11 (Table 12 for voc2012-action).
    """
    check_layer_option(layer, arch)
    from ..transfer import markdown_report, run_transfer, write_report
    from ..transfer.report import held_out_warning

    results = run_transfer(
        protocol, list(features), data=data, crops=crops, setting=setting, aggregate=aggregate,
        layer=layer, scales=scales, arch=arch, weights=weights,
        extract_options=dict(batch_size=batch_size, workers=workers, device=device, amp=amp,
                             backend=backend),
        progress=not quiet, classifier=classifier, splits=splits,
        train_per_class=train_per_class, test_per_class=test_per_class, C_grid=C_grid, seed=seed)
    click.echo(markdown_report(results))
    for warning in filter(None, map(held_out_warning, results)):
        click.echo(f"Warning: {warning}", err=True)
    if report:
        written = write_report(results, report)
        click.echo(f"wrote {', '.join(map(str, written))}", err=True)
