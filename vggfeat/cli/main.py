"""``vggfeat`` entry point; the library's user errors become one-line messages.

Only :class:`vggfeat.errors.VGGFeatError` (and click's own usage errors) are shown that way:
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys
import warnings

import click

from .. import __version__
from ..errors import VGGFeatError

# name: (module of vggfeat.cli, attribute, one line for ``vggfeat --help``).  A command's module
# (and torch with it) is imported only when that command runs or shows its own help.
COMMANDS = {
    "info": ("info", "info_command", "Layers, parameters and multiply-adds of every config."),
    "extract": ("extract", "extract_command",
                "Dense multi-scale descriptors of images into a resumable HDF5 cache."),
    "evaluate": ("evaluate", "evaluate_command",
                 "Top-1/top-5 error on ImageNet val with the paper's test methods."),
    "scoremap": ("evaluate", "scoremap_command", "Draw the dense class score map of an image."),
    "transfer": ("transfer", "transfer_command",
                 "Linear classifiers on descriptors, scored as the paper did (Tables 11, 12)."),
    "train": ("train", "train_command",
              "Train a VGG with the paper's recipe, or fine-tune one on your class folders."),
    "store": ("store", "store_group",
              "Feature stores (folders of shards): info, compact, export."),
    "localize": ("localize", "localize_group",
                 "Localisation nets of the paper's Appendix A: train, evaluate, score."),
}


class LazyGroup(click.Group):
    """A click group that imports a command's module only when that command is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(f".{module}", __package__), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, _, text) in COMMANDS.items()])


@click.group(cls=LazyGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vggfeat")
def cli() -> None:
    """Faithful VGG (Simonyan & Zisserman, ICLR 2015): models, dense multi-scale features,
    ImageNet evaluation and training, transfer to other datasets.

    `vggfeat COMMAND --help` describes each command."""


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line for the user (``Warning: …``), not as a source location; on a line
    of their own while a progress bar is drawn (tqdm's ``write`` moves the bar below them)."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None and getattr(tqdm.tqdm, "_instances", None):
        tqdm.tqdm.write(f"Warning: {message}", file=sys.stderr)
    else:
        click.echo(f"Warning: {message}", err=True)


def main(argv: list[str] | None = None) -> None:
    try:
        with warnings.catch_warnings():  # the library's own display comes back afterwards
            warnings.showwarning = _show_warning
            cli.main(args=argv, prog_name="vggfeat", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except VGGFeatError as err:
        click.echo(f"Error: {err}", err=True)
        sys.exit(err.exit_code)
