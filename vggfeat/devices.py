"""Checking a device name before any work starts, so a typo or a missing GPU is one clear line."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from .choices import DEVICE_KINDS as KINDS
from .errors import ConfigError

if TYPE_CHECKING:
    import torch


def default_device() -> str:
    """Where a command runs when no device is given: the first CUDA GPU if PyTorch sees one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_workers() -> int:
    """Image-decoding worker processes when none are given: half the cores, 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def check_device_name(device: str) -> str:
    """``device`` if it is spelled as one (``cpu``, ``cuda``, ``cuda:1``, ``mps``), else a
    :class:`ConfigError`: the part of :func:`resolve_device` that needs no torch, so the command
    line answers a typo at once (whether this machine has the device is asked when it runs)."""
    if not re.fullmatch(r"(?:%s)(?::\d+)?" % "|".join(KINDS), device):
        raise ConfigError(f"unknown device {device!r}; use one of {', '.join(KINDS)} (or cuda:N)")
    return device


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` → ``torch.device``, if this machine has it.

    Raises :class:`ConfigError` naming the device and what to use instead.
    """
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"unknown device {device!r}; use one of {', '.join(KINDS)} (or cuda:N)"
                          ) from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "with CUDA " + torch.version.cuda if torch.version.cuda else "without CUDA"
            raise ConfigError(f"device {device!r}: no CUDA GPU is visible to PyTorch "
                              f"{torch.__version__} (built {build}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} "
                              f"CUDA GPU(s), cuda:0 … cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r}: Apple's MPS backend is not available here; use "
                          "--device cpu")
    elif dev.type not in KINDS:
        raise ConfigError(f"device {device!r} is not supported; use one of {', '.join(KINDS)}")
    return dev
