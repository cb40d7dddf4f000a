"""``vggfeat`` entry point; the library's user errors become one-line messages.

Only :class:`vggfeat.errors.VGGFeatError` (and click's own usage errors) are shown that way:
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import VGGFeatError
from .evaluate import evaluate_command, scoremap_command
from .extract import extract_command
from .info import info_command
from .train import train_command
from .transfer import transfer_command

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vggfeat")
def cli() -> None:
    """Faithful VGG (Simonyan & Zisserman, ICLR 2015): models, dense multi-scale features,
    ImageNet evaluation and training, transfer to other datasets."""


cli.add_command(info_command)
cli.add_command(extract_command)
cli.add_command(evaluate_command)
cli.add_command(scoremap_command)
cli.add_command(transfer_command)
cli.add_command(train_command)


def main(argv: list[str] | None = None) -> None:
    try:
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
