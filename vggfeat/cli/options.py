"""Click option types and options shared by several commands.

Everything here is checked without torch (names come from :mod:`vggfeat.choices` and the configs
table), so ``--help`` and argument errors answer at once; commands import the network code in
their bodies.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..choices import BACKENDS, HDF5_SUFFIXES
from ..devices import check_device_name, resolve_device
from ..models.configs import check_layer_name, parse_arch


class IntList(click.ParamType):
    """Comma-separated integers, e.g. ``256,384,512``."""

    name = "LIST"
    item, example = int, "256,384,512"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            items = tuple(self.item(v) for v in str(value).replace(" ", "").split(",") if v)
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.item.__name__}s, e.g. "
                      f"{self.example}", param, ctx)
        if not items:
            self.fail("give at least one value", param, ctx)
        return items


class FloatList(IntList):
    """Comma-separated numbers, e.g. ``0.1,1,10``."""

    item, example = float, "0.1,1,10"


class Checked(click.ParamType):
    """A value checked at parse time by :meth:`check`: its ``ValueError`` (the library's
    ``ConfigError`` included) becomes click's usage error, with the message as is."""

    def check(self, value) -> None:
        raise NotImplementedError

    def convert(self, value, param, ctx):
        try:
            self.check(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)
        return value


class Arch(Checked):
    """A VGG config or alias, checked at parse time so the error lists the choices."""

    name = "ARCH"

    def check(self, value) -> None:
        parse_arch(value)


class Device(Checked):
    """A device this machine has, checked before any work starts: the name without torch, and
    for a GPU whether there is one (asking needs torch, which a GPU run loads anyway)."""

    name = "DEVICE"

    def check(self, value) -> None:
        if check_device_name(value) != "cpu":
            resolve_device(value)


def check_layer_option(layer: str, arch: str | None) -> None:
    """``--layer`` against the names of ``--arch`` (of any config when not given), with the
    closest name suggested for a typo; called first thing in a command, before torch loads."""
    try:
        check_layer_name(layer, arch)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="'--layer'") from None


class HDF5Output(click.Path):
    """The HDF5 file a command writes (not a folder), refused at once when named otherwise."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False)

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        path = Path(value)
        if path.suffix.lower() not in HDF5_SUFFIXES:
            self.fail(f"{value} must be named .h5 or .hdf5: vggfeat writes HDF5 files "
                      f"(e.g. {path.with_suffix('.h5').name})", param, ctx)
        return value


def device_option(f):
    return click.option("--device", type=Device(), default=None,
                        help="cpu, cuda, cuda:1 … [default: cuda when available]")(f)


def device_options(f):
    f = device_option(f)
    f = click.option("--workers", type=click.IntRange(0), default=None,
                     help="decoding worker processes [default: half the cores, at most 8]")(f)
    f = click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True,
                     help="images per forward pass")(f)
    return f


def backend_option(f):
    return click.option(
        "--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
        help="how the net's layers run: eager (torch's own), winograd (Winograd 3×3 "
             "convolutions and GEMM fc layers, float32 CPU), or auto (per layer, whichever is "
             "faster on this CPU; eager on GPUs)")(f)


def model_options(f):
    f = click.option("--weights", default="torchvision", show_default=True,
                     help="torchvision, timm, random, or a .safetensors/.pth file")(f)
    f = click.option("--arch", type=Arch(), default=None,
                     help="VGG config: A, A-LRN, B, C, D, E or vgg16, vgg19_bn … [default: D, or "
                          "what the weights file records]")(f)
    return f
