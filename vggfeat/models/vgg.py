"""The VGG network of Table 1, with paper/Caffe layer names and two execution modes.

One set of parameters serves both modes.  fc6 is stored as a 7×7 convolution and fc7/fc8 as 1×1
convolutions (as timm's ``ConvMlp`` does), so

* crop mode, ``model(x)`` on N×3×224×224, gives N×num_classes logits, and
* dense mode, ``model.score_map(x)`` on any image of at least 224 px, gives the class score map
  N×num_classes×h×w (h = H/32 − 6), the paper's fully-convolutional test-time net.

The contract is timm's: :meth:`VGG.forward_features` (image → pool5) then :meth:`VGG.forward_head`
(pool5 → pooled N×num_classes logits); :meth:`VGG.forward_head_dense` keeps the head's output
as a map.  timm's ``reset_classifier``, ``get_classifier`` and ``forward_intermediates`` behave as in
timm.  ``feature_info`` is timm's: the stage ends that ``forward_intermediates`` returns;
``layer_info`` describes every named layer, and any of them can be read with
:meth:`VGG.forward_layers`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .configs import (
    FC6_KERNEL,
    FC_DIM,
    INPUT_SIZE,
    LRN_SETTINGS,
    NUM_CLASSES,
    PRE,
    STRIDE,
    ArchSpec,
    layer_names,
    parse_arch,
    scaled,
    unknown_layer,
)
from .preprocessing import IMAGENET, Preprocessing

GLOBAL_POOLS = ("avg", "max")


class DenseLinear(nn.Module):
    """A fully-connected layer stored as a k×k convolution.

    On a k×k input it runs as a matrix product over the flattened window (crop mode, fast); on a
    larger input it slides as a convolution (dense mode).  Both use the same ``weight`` tensor of
    shape (out_features, in_channels, k, k); the flattening order (C, H, W) is torchvision's.
    """

    def __init__(self, in_channels: int, out_features: int, kernel_size: int = 1) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.empty(out_features, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    def forward(self, x: Tensor) -> Tensor:
        k = self.kernel_size
        if x.shape[-2:] == (k, k):
            w = self.weight
            if not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last):
                # Flatten in (H, W, C) order: a view of a channels_last weight, where flatten(1)
                # would copy all of fc6 (411 MB) on every forward.
                return F.linear(x.permute(0, 2, 3, 1).flatten(1), w.permute(0, 2, 3, 1).flatten(1),
                                self.bias)[:, :, None, None]
            return F.linear(x.flatten(1), w.flatten(1), self.bias)[:, :, None, None]
        return F.conv2d(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        out_f, in_c = self.weight.shape[:2]
        return f"{in_c}, {out_f}, kernel_size={self.kernel_size}"


class VGG(nn.Module):
    """A VGG config of Table 1 (A, A-LRN, B, C, D, E), optionally with batch norm or reduced widths.

    Args:
        arch: ``"A"`` … ``"E"``, ``"A-LRN"`` or an alias (``"vgg16"``, ``"vgg16_bn"``).
        batch_norm: add BatchNorm2d after every conv (torchvision's ``vgg*_bn``).
        num_classes: outputs of fc8; 0 leaves fc8 out (the net then ends at fc7, as timm's
            ``num_classes=0``).
        width_mult: multiplies every conv width (64 … 512); 1.0 is the paper's net.
        fc_dim: width of fc6 and fc7 (4096 in the paper).
        dropout: dropout probability after fc6 and fc7 (training only).
    """

    def __init__(self, arch: str = "D", *, batch_norm: bool | None = None,
                 num_classes: int = NUM_CLASSES, width_mult: float = 1.0, fc_dim: int = FC_DIM,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if width_mult <= 0 or fc_dim <= 0 or num_classes < 0:
            raise ConfigError("width_mult and fc_dim must be positive and num_classes ≥ 0, got "
                             f"{width_mult}, {fc_dim}, {num_classes}")
        self.spec: ArchSpec = parse_arch(arch, batch_norm=batch_norm)
        self.config = {"arch": self.spec.config, "batch_norm": self.spec.batch_norm,
                       "num_classes": num_classes, "width_mult": width_mult, "fc_dim": fc_dim}
        # What the attached weights expect; loaders replace it.
        self.preprocessing: Preprocessing = IMAGENET
        self.weights_meta: dict = {"source": "random"}

        layers: OrderedDict[str, nn.Module] = OrderedDict()
        taps: dict[str, str] = {}  # public layer name -> module whose output it is
        in_ch = 3
        for name, layer in layer_names(self.spec.config):
            if layer == "M":
                layers[name] = nn.MaxPool2d(2, 2)
                taps[name] = name
            elif layer == "LRN":
                layers[name] = nn.LocalResponseNorm(**LRN_SETTINGS)
                taps[name] = name
            else:
                width, kernel = (layer, 3) if isinstance(layer, int) else layer
                out_ch = scaled(width, width_mult)
                suffix = name[len("conv"):]
                layers[name] = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2)
                taps[name + PRE] = name
                if self.spec.batch_norm:
                    layers["bn" + suffix] = nn.BatchNorm2d(out_ch)
                    taps[name + PRE] = "bn" + suffix
                # Not in place: the pre-activation value must survive for ``conv*:pre`` read-outs.
                layers["relu" + suffix] = nn.ReLU()
                taps[name] = "relu" + suffix
                in_ch = out_ch
        self.features = nn.Sequential(layers)
        self.head = nn.Sequential(OrderedDict(
            fc6=DenseLinear(in_ch, fc_dim, FC6_KERNEL), relu6=nn.ReLU(), drop6=nn.Dropout(dropout),
            fc7=DenseLinear(fc_dim, fc_dim, 1), relu7=nn.ReLU(), drop7=nn.Dropout(dropout),
            fc8=_classifier(fc_dim, num_classes)))
        taps.update({"fc6:pre": "fc6", "fc6": "relu6", "fc7:pre": "fc7", "fc7": "relu7",
                     "fc8": "fc8"})
        self._tap_modules = taps
        self.num_features = in_ch  # timm's names: channels of pool5, and of the pooled fc7
        self.head_hidden_size = fc_dim
        self.global_pool = "avg"
        # timm's stage ends: the output before each max-pool, then pool5 itself.
        pools = [i for i, m in enumerate(self.features) if isinstance(m, nn.MaxPool2d)]
        self._stage_ends = [i - 1 for i in pools] + [pools[-1]]
        self._index_layers()

    # -- metadata -------------------------------------------------------------------------------

    def _index_layers(self) -> None:
        """Positions, layer_info and feature_info of the readable layers (again after a new
        classifier)."""
        self.num_classes = self.config["num_classes"]
        taps = {k: v for k, v in self._tap_modules.items() if k != "fc8" or self.num_classes}
        position = {name: i for i, (name, _) in enumerate(self._modules_in_order)}
        self._taps = {layer: position[module] for layer, module in taps.items()}
        self.layer_info = self._layer_info(taps)
        # timm's meaning: one entry per intermediate of forward_intermediates (the stage ends).
        names = [name for name, _ in self.features.named_children()]
        stage_ends = {f"features.{names[i]}" for i in self._stage_ends}
        self.feature_info = [info for info in self.layer_info if info["module"] in stage_ends]

    @property
    def _modules_in_order(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of the feature and head layers in network order, as they are now."""
        return [*self.features.named_children(), *self.head.named_children()]

    def _layer_info(self, taps: dict[str, str]) -> list[dict]:
        """timm-style description of each readable layer: channels, stride (px) and module."""
        info, reduction, channels = [], 1, 3
        for name, module in self.features.named_children():
            if isinstance(module, nn.MaxPool2d):
                reduction *= 2
            if isinstance(module, nn.Conv2d):
                channels = module.out_channels
            if name in taps:
                info.append({"name": name, "num_chs": channels, "reduction": reduction,
                             "module": f"features.{taps[name]}"})
        fc_dim = self.head_hidden_size
        for name, chs in (("fc6", fc_dim), ("fc7", fc_dim), ("fc8", self.num_classes)):
            if name in taps:
                info.append({"name": name, "num_chs": chs, "reduction": STRIDE,
                             "module": f"head.{taps[name]}"})
        return info

    @property
    def layer_names(self) -> list[str]:
        """Every name :meth:`forward_layers` accepts, in network order (``:pre`` ones included)."""
        names = sorted(self._taps, key=lambda n: (self._taps[n], n))
        return names + ["prob"] if self.num_classes else names

    def check_layer(self, name: str) -> str:
        """Return ``name`` if it is a readable layer; else raise ``ConfigError`` suggesting the
        closest name (``FC7`` → ``fc7``), or listing them all."""
        if name not in self._taps and (name != "prob" or not self.num_classes):
            raise unknown_layer(name, self.layer_names, self.spec.name)
        return name

    def layer_channels(self, name: str) -> int:
        """Channels of a readable layer's output map."""
        base = self.check_layer(name).removesuffix(PRE)
        if base == "prob":
            return self.num_classes
        return next(info["num_chs"] for info in self.layer_info if info["name"] == base)

    # -- forward contract ----------------------------------------------------------------------

    def forward_features(self, x: Tensor) -> Tensor:
        """N×3×H×W normalised image → pool5 map N×C×H/32×W/32."""
        return self.features(x)

    def forward_head(self, x: Tensor, *, pre_logits: bool = False) -> Tensor:
        """pool5 map N×C×h×w (h, w ≥ 7) → N×num_classes logits, as timm's VGG.

        fc6 and fc7 run densely, fc7 is pooled over positions (``global_pool``, average by
        default), and fc8 maps the pooled vector to logits.  On a 7×7 map (a 224 crop) this is
        the plain classifier; on a larger one the logits are the mean of the dense score map.
        ``pre_logits=True`` returns the pooled fc7, N×fc_dim.
        """
        x = self.forward_head_dense(x, pre_logits=True)
        x = x.amax((2, 3)) if self.global_pool == "max" else x.mean((2, 3))
        return x if pre_logits else self.head.fc8(x[:, :, None, None]).flatten(1)

    def forward_head_dense(self, x: Tensor, *, pre_logits: bool = False) -> Tensor:
        """pool5 map N×C×h×w (h, w ≥ 7) → dense head output N×K×(h−6)×(w−6), unpooled.

        K is num_classes (the class score map), or fc_dim with ``pre_logits=True`` (fc7 after its
        ReLU).
        """
        if x.shape[-1] < FC6_KERNEL or x.shape[-2] < FC6_KERNEL:
            raise ConfigError(f"pool5 map {tuple(x.shape[-2:])} is smaller than fc6's 7×7 window: "
                             f"the input image must be at least {INPUT_SIZE} px on each side")
        head = self.head[:-1] if pre_logits else self.head
        return head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Crop mode: N×3×224×224 (anything whose pool5 is 7×7) → N×num_classes logits."""
        feats = self.forward_features(x)
        if feats.shape[-2:] != (FC6_KERNEL, FC6_KERNEL):
            raise ConfigError(f"crop mode needs a {INPUT_SIZE}×{INPUT_SIZE} input (pool5 7×7); got "
                             f"{tuple(x.shape[-2:])}. Use model.score_map(x) for dense evaluation "
                             "of larger images, or crop/resize to 224 first.")
        return self.forward_head(feats)

    def score_map(self, x: Tensor) -> Tensor:
        """Dense mode: N×3×H×W (H, W ≥ 224) → class score map N×num_classes×(H//32−6)×(W//32−6)."""
        check_dense_input(x)
        return self.forward_head_dense(self.forward_features(x))

    # -- timm's classifier and intermediates API ------------------------------------------------

    def get_classifier(self) -> nn.Module:
        """fc8, the layer that maps fc7 to class logits (``nn.Identity`` when num_classes is 0)."""
        return self.head.fc8

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace fc8 by a freshly initialised one with ``num_classes`` outputs (0: none).

        ``global_pool`` (``"avg"`` or ``"max"``) sets how :meth:`forward_head` pools fc7.  The
        rest of the net is untouched; the new fc8 is on fc7's device and dtype.
        """
        if num_classes < 0:
            raise ConfigError(f"num_classes must be ≥ 0, got {num_classes}")
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ConfigError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
        fc7 = self.head.fc7.weight
        self.head.fc8 = _classifier(self.head_hidden_size, num_classes).to(fc7.device, fc7.dtype)
        self.config["num_classes"] = num_classes
        self.weights_meta = {**self.weights_meta, "new_head": {"num_classes": num_classes}}
        self.weights_meta.pop("class_names", None)
        self._index_layers()

    def forward_intermediates(self, x: Tensor, indices: int | Sequence[int] | None = None, *,
                              norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False
                              ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """timm's intermediates of VGG: the five conv stages' outputs (after the ReLU, before
        each max-pool: conv1_2 … conv5_3 in D) at indices 0–4, and pool5 at index 5.

        ``indices``: the last n stages if an int, all if None, else those positions (negative
        ones count from the end).  Returns ``(pool5, [maps])``, or only the maps with
        ``intermediates_only``; ``stop_early`` stops after the deepest map asked for (the first
        element is then that map).  ``norm`` is accepted for timm's signature (VGG has no final
        norm).
        """
        if output_fmt != "NCHW":
            raise ConfigError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        take = _take_indices(len(self._stage_ends), indices)
        ends = {self._stage_ends[i] for i in take}
        last = max(ends) if stop_early else len(self.features) - 1
        maps = []
        for i, module in enumerate(self.features[:last + 1]):
            x = module(x)
            if i in ends:
                maps.append(x)
        return maps if intermediates_only else (x, maps)

    def forward_layers(self, x: Tensor, layers: Iterable[str]) -> dict[str, Tensor]:
        """Read named layers in one pass: ``{"conv5_3": N×512×h×w, "fc7:pre": N×4096×h'×w', …}``.

        A plain name is the value after the ReLU (as Caffe's in-place blobs hold it), ``NAME:pre``
        the value before it, ``prob`` the per-location softmax over fc8.  Head layers need an input
        of at least 224 px; on a 224 input their maps are 1×1.  The pass stops at the deepest
        layer asked for.
        """
        wanted = [self.check_layer(name) for name in layers]
        if not wanted:
            raise ConfigError("forward_layers needs at least one layer name")
        positions = {name: self._taps["fc8" if name == "prob" else name] for name in wanted}
        head_start = len(self.features)
        if max(positions.values()) >= head_start:
            check_dense_input(x)
        out: dict[str, Tensor] = {}
        for i, (_, module) in enumerate(self._modules_in_order[:max(positions.values()) + 1]):
            x = module(x)
            for name, pos in positions.items():
                if pos == i:
                    out[name] = x.softmax(dim=1) if name == "prob" else x
        return {name: out[name] for name in wanted}

    def layer_shapes(self, input_size: Sequence[int] = (INPUT_SIZE, INPUT_SIZE)) -> dict[str, tuple]:
        """Output shape (C, h, w) of every named layer for one H×W input, computed without data."""
        with torch.device("meta"):
            meta = VGG(**self.config)
        names = [n for n in self.layer_names if n != "prob"]
        maps = meta.eval().forward_layers(torch.empty(1, 3, *input_size, device="meta"), names)
        return {name: tuple(t.shape[1:]) for name, t in maps.items()}


def _classifier(fc_dim: int, num_classes: int) -> nn.Module:
    return DenseLinear(fc_dim, num_classes, 1) if num_classes else nn.Identity()


def _take_indices(n: int, indices: int | Sequence[int] | None) -> list[int]:
    """timm's ``feature_take_indices``: the last n if an int, all if None, else those given."""
    if indices is None:
        indices = n
    if isinstance(indices, int):
        if not 0 < indices <= n:
            raise ConfigError(f"indices={indices}: there are {n} intermediates; ask for 1 to {n}")
        return list(range(n - indices, n))
    take = [i + n if i < 0 else i for i in indices]
    bad = [i for i, t in zip(indices, take) if not 0 <= t < n]
    if bad or not take:
        raise ConfigError(f"indices {list(indices)} out of range: there are {n} intermediates "
                         f"(0…{n - 1}, or negative from the end)")
    return take


def check_dense_input(x: Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ConfigError(f"expected an N×3×H×W image batch, got shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < INPUT_SIZE:
        raise ConfigError(f"dense mode needs images of at least {INPUT_SIZE} px on each side, got "
                         f"{tuple(x.shape[-2:])}; rescale so the smallest side is Q ≥ {INPUT_SIZE}")


def score_map_size(height: int, width: int) -> tuple[int, int]:
    """Spatial size of the dense class score map for an H×W input: (H//32 − 6, W//32 − 6)."""
    return height // STRIDE - (FC6_KERNEL - 1), width // STRIDE - (FC6_KERNEL - 1)
