"""``vggfeat evaluate`` and ``vggfeat scoremap``."""

from __future__ import annotations

import click

from ..choices import METHODS
from .options import IntList, backend_option, device_option, device_options, model_options


@click.command("evaluate")
@model_options
@click.option("--data", type=click.Path(exists=True, file_okay=False),
              help="ILSVRC-2012 val: class folders named by WordNet id, or flat images")
@click.option("--devkit", type=click.Path(exists=True, file_okay=False),
              help="ILSVRC2012_devkit_t12 folder, for flat val images")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False),
              help="filename,wnid CSV (e.g. LOC_val_solution.csv), for flat val images")
@click.option("--method", type=click.Choice(METHODS), default="dense", show_default=True)
@click.option("--scales", type=IntList(), default=None,
              help="test scales Q [default: the paper's: {S-32,S,S+32} for a fixed training S, "
                   "raised to at least 224 (224,256 for S=224); 256,384,512 for jittered or "
                   "unknown S; 256 for center-crop]")
@click.option("--train-scale", default=None,
              help="training S of the weights (256, 384 or 256-512) when the file does not say")
@click.option("--fuse", "fuse_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="posterior files to fuse instead of running a net (give two or more)")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="write the summary here")
@click.option("--report", type=click.Path(dir_okay=False), help="write the Markdown table here")
@click.option("--save-posteriors", "posteriors_out", type=click.Path(dir_okay=False),
              help="HDF5 of the per-image posteriors, for fusion")
@device_options
@click.option("--amp", type=click.Choice(["bf16", "fp16"]), default=None)
@backend_option
@click.option("--quiet", is_flag=True)
def evaluate_command(arch, weights, data, devkit, labels, method, scales, train_scale, fuse_files,
                     json_out, report, posteriors_out, batch_size, workers, device, amp, backend,
                     quiet) -> None:
    """Top-1/top-5 error on ImageNet val with the paper's test methods (Tables 3–6)."""
    from ..data.folders import folder_for_net
    from ..evaluate import evaluate, fuse, load_posteriors, markdown_report, save_posteriors
    from ..evaluate.run import write_json
    from ..fileio import write_text_atomic
    from ..models import vgg

    if fuse_files:
        result = fuse([load_posteriors(p) for p in fuse_files])
    else:
        if data is None:
            raise click.UsageError("give --data VAL_DIR, or --fuse with posterior files")
        model = vgg(arch, weights=weights, progress=not quiet)
        images = folder_for_net(data, model, devkit=devkit, labels_csv=labels)
        result = evaluate(images, model, method=method, scales=scales, train_scale=train_scale,
                          batch_size=batch_size, workers=workers, device=device, amp=amp,
                          backend=backend,
                          progress=not quiet)
        for path, reason in result.failed:
            click.echo(f"skipped {path}: {reason}", err=True)
        if not quiet:
            rate = len(result.labels) / result.seconds if result.seconds else 0.0
            click.echo(f"{len(result.labels)} images, {len(result.failed)} failed ({rate:.2f} "
                       f"img/s, images per forward: {result.images_per_forward:.1f}, backend: "
                       f"{result.backend})", err=True)
    if posteriors_out:
        save_posteriors(result, posteriors_out)
    if json_out:
        write_json(result, json_out)
    table = markdown_report(result)
    if report:
        write_text_atomic(report, table)
    click.echo(table)


@click.command("scoremap")
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG to write")
@model_options
@click.option("--scale", type=click.IntRange(224), default=384, show_default=True, help="Q in px")
@click.option("--class", "class_index", type=int, default=None, help="class index [default: top]")
@device_option
def scoremap_command(image, output, arch, weights, scale, class_index, device) -> None:
    """Draw the dense class score map of IMAGE's top class over the image (PNG)."""
    from ..evaluate import plot_score_map
    from ..models import vgg

    k, p = plot_score_map(vgg(arch, weights=weights), image, output, scale=scale,
                          class_index=class_index, device=device)
    click.echo(f"class {k} (p={p:.3f}) → {output}")
