"""How a VGG's layers run at inference: the backends of ``vggfeat extract`` and ``evaluate``.

* ``eager``: torch's own layers (oneDNN convolutions on CPUs, cuDNN on GPUs).
* ``winograd``: every 3×3 layer by Winograd F(4×4, 3×3) with its ReLU fused in (see
  :mod:`vggfeat.models.winograd`), and fc6–fc8 applied densely as one matrix product over their
  sliding windows; float32 on CPUs only.
* ``auto`` (default): on a CPU in float32, each layer runs whichever of its two paths was faster
  on this machine for its channels and input size, measured the first time that case comes up
  and remembered under ``kernel_dir()/backend-choices/``; elsewhere (GPUs, bf16/fp16) ``eager``.

Descriptors agree across backends to about 1e-5 after L2 normalisation; use ``eager`` where
results must match torch's bit for bit.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import platform
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..choices import BACKENDS
from ..errors import ConfigError
from ..fileio import write_json_atomic
from .vgg import PRE, VGG, DenseLinear
from .winograd import (
    SOURCE,
    WinogradConv2d,
    cpu_name,
    kernel_dir,
    load_kernels,
    run_layer,
    winograd_eligible,
)

# Largest im2col copy of a dense fc layer's input windows (bytes).
IM2COL_BYTES = 256 * 2**20
# How auto times a case and what it times (part of the choices file's name): choices timed by
# an earlier method are measured again.  3: both paths in turns, Winograd blocks sized to the
# channels (2: 256-tile blocks; 1: one path's two runs, then the other's).
MEASUREMENT = 3


def check_backend(backend: str) -> str:
    """``backend`` if it names one of :data:`BACKENDS`, else a :class:`ConfigError`."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def resolve_backend(backend: str, *, device: torch.device, amp_dtype: torch.dtype | None) -> str:
    """The backend that will run: ``eager`` wherever only torch's layers apply."""
    check_backend(backend)
    cpu_fp32 = device.type == "cpu" and amp_dtype is None
    if backend == "winograd" and not cpu_fp32:
        where = f"{device.type} with {amp_dtype}" if amp_dtype else device.type
        raise ConfigError(f"the winograd backend runs float32 on CPUs, not on {where}: use the "
                          "eager or auto backend (--backend eager)")
    # Kernels are built (or found missing, with a warning) now, before any progress bar starts.
    if backend == "auto" and (not cpu_fp32 or load_kernels() is None):
        return "eager"
    if backend == "winograd":
        load_kernels()
    return backend


class GemmDenseLinear(DenseLinear):
    """fc6–fc8 applied densely as one matrix product over their sliding windows (im2col), where
    torch's k×k convolution runs well below the CPU's matrix-product rate.  Shares the original
    layer's parameters; ``fast``/``eager``/``auto`` as in :class:`WinogradConv2d`."""

    @classmethod
    def from_dense(cls, layer: DenseLinear, *, auto=None) -> GemmDenseLinear:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.kernel_size, new.weight, new.bias = layer.kernel_size, layer.weight, layer.bias
        new.auto = auto
        return new

    def fast(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        k, out = self.kernel_size, self.weight.shape[0]
        # Windows flattened in the weight's own memory order, so the weight is only viewed.
        if self.weight.is_contiguous():
            order, weight = (0, 2, 3, 1, 4, 5), self.weight.view(out, -1)
        else:  # channels_last: (kh, kw, C)
            order, weight = (0, 2, 3, 4, 5, 1), self.weight.permute(0, 2, 3, 1).reshape(out, -1)
        # Output rows a chunk at a time, so that the copied windows stay within IM2COL_BYTES.
        row_bytes = n * (w - k + 1) * k * k * c * x.element_size()
        step = max(1, IM2COL_BYTES // row_bytes)
        chunks = []
        for top in range(0, h - k + 1, step):
            part = x[:, :, top:top + step + k - 1]
            windows = part.unfold(2, k, 1).unfold(3, k, 1).permute(order)  # N×h'×w'×…
            y = F.linear(windows.reshape(-1, k * k * c), weight, self.bias)
            chunks.append(y.view(n, -1, w - k + 1, out))
        return torch.cat(chunks, dim=1).permute(0, 3, 1, 2)

    def eager(self, x: Tensor) -> Tensor:
        return super().forward(x)

    def forward(self, x: Tensor) -> Tensor:
        dense = x.shape[-2:] != (self.kernel_size, self.kernel_size)  # crop mode: a GEMM already
        return run_layer(self, x) if dense else self.eager(x)


def with_backend(model: VGG, backend: str, *, reads: Iterable[str] | None = None,
                 choices: LayerChoices | None = None) -> VGG:
    """``model`` itself for ``eager``; otherwise a copy, sharing the original's parameters
    (which are not changed), whose 3×3 layers are :class:`WinogradConv2d` and whose head layers
    are :class:`GemmDenseLinear`.

    ``reads`` names the layers the caller reads (:meth:`VGG.forward_layers` names): the ReLU
    after a 3×3 layer is fused into it unless that layer's ``:pre`` value is read (None: any
    may be, nothing is fused).  ``choices`` default to :meth:`LayerChoices.for_this_machine`.
    """
    if backend == "eager":
        return model
    auto = (choices or LayerChoices.for_this_machine()).run if backend == "auto" else None
    pre_read = None if reads is None else {n[:-len(PRE)] for n in reads if n.endswith(PRE)}
    layers = list(model.features.named_children())
    features: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (name, layer) in enumerate(layers):
        if name in features:  # a ReLU fused into the layer before it
            continue
        if not winograd_eligible(layer):
            features[name] = layer
            continue
        after, next_layer = layers[i + 1] if i + 1 < len(layers) else (None, None)
        relu = pre_read is not None and name not in pre_read and isinstance(next_layer, nn.ReLU)
        features[name] = WinogradConv2d.from_conv(layer, relu=relu, auto=auto)
        if relu:
            features[after] = nn.Identity()
    head = OrderedDict((name, GemmDenseLinear.from_dense(layer, auto=auto)
                        if type(layer) is DenseLinear else layer)
                       for name, layer in model.head.named_children())
    # A copy of the net's structure and metadata that shares its parameters and buffers; layers
    # keep their names, so the copy's layer positions and layer_info are the original's.
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    new = copy.deepcopy(model, shared)
    new.features, new.head = nn.Sequential(features), nn.Sequential(head)
    return new


def _case(layer: nn.Module, x: Tensor) -> str:
    """What decides the faster path: the layer kind, channels in and out, and the work's size
    (input pixels, batch included, to the nearest power of two)."""
    n, c, h, w = x.shape
    kind = "fc" if isinstance(layer, DenseLinear) else "conv"
    return f"{kind}{c}x{layer.weight.shape[0]}@2^{round(math.log2(n * h * w))}"


class LayerChoices:
    """Per-case choice between a layer's fast path and torch's, measured once per machine.

    The first call in a case times both paths on its input, in turns (best of two runs each),
    keeps the faster and returns the output of its last run, so measuring costs three extra
    runs of the layer, not four; choices are saved to ``path`` (JSON) and reused by later
    processes.  ``path=None`` keeps them in memory only.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.choices: dict[str, str] = {}
        if path is not None:
            try:
                saved = json.loads(path.read_text())
                self.choices = {k: v for k, v in saved.items() if v in ("fast", "eager")}
            except (OSError, ValueError, AttributeError):  # none yet, or unreadable (a cache
                self.choices = {}  # folder this user cannot enter): measure again

    @classmethod
    def for_this_machine(cls) -> LayerChoices:
        """Choices kept under :func:`kernel_dir`, one file per CPU, thread count, torch,
        kernel source and way of timing (:data:`MEASUREMENT`), since each changes which path
        wins."""
        source = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
        machine = (f"{platform.machine()}-{cpu_name()}-{torch.get_num_threads()}t-"
                   f"torch{torch.__version__}-{source}-m{MEASUREMENT}")
        safe = "".join(ch if ch.isalnum() or ch in "-._" else "_" for ch in machine)
        return cls(kernel_dir() / "backend-choices" / f"{safe}.json")

    def run(self, layer: nn.Module, x: Tensor) -> Tensor:
        """The layer's output by the path that is (or, for a new case, was just measured) the
        faster for this call."""
        case = _case(layer, x)
        if case in self.choices:
            return layer.fast(x) if self.choices[case] == "fast" else layer.eager(x)
        y, self.choices[case] = _measure(layer, x)
        self._save()
        return y

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, self.choices)
        except OSError:
            pass  # a read-only cache only costs measuring again next time


def _measure(layer: nn.Module, x: Tensor) -> tuple[Tensor, str]:
    """Time ``layer.fast`` and ``layer.eager`` on ``x``, best of two runs each: (the output of
    the faster, its name).

    The runs alternate (fast, eager, then the one behind, then the one ahead), so that a
    change in the machine's load weighs on both; the last run is the leader's, whose output
    is returned without running it again unless the lead changed on the last run.
    """
    paths = {"fast": layer.fast, "eager": layer.eager}
    best = dict.fromkeys(paths, math.inf)

    def timed(name: str) -> Tensor:
        start = time.perf_counter()
        y = paths[name](x)
        best[name] = min(best[name], time.perf_counter() - start)
        return y

    timed("fast")  # each output is dropped at once: one layer output at a time, as in a pass
    timed("eager")
    leader = min(best, key=best.get)
    timed("eager" if leader == "fast" else "fast")
    y = timed(leader)
    winner = min(best, key=best.get)
    return (y if winner == leader else paths[winner](x)), winner
