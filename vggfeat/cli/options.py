"""Click option types and options shared by several commands."""

from __future__ import annotations

import click

from ..devices import resolve_device  # torch: already loaded by models below
from ..models.backends import BACKENDS
from ..models.configs import parse_arch


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
    """A torch device this machine has, checked before any work starts."""

    name = "DEVICE"

    def check(self, value) -> None:
        resolve_device(value)


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
