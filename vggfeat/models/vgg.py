"""The VGG network of Table 1, with paper/Caffe layer names and two execution modes.

One set of parameters serves both modes.  fc6 is stored as a 7×7 convolution and fc7/fc8 as 1×1
convolutions (as timm's ``ConvMlp`` does), so

* crop mode, ``model(x)`` on N×3×224×224, gives N×num_classes logits, and
* dense mode, ``model.score_map(x)`` on any image of at least 224 px, gives the class score map
  N×num_classes×h×w (h = H/32 − 6), the paper's fully-convolutional test-time net.

The contract is timm's: :meth:`VGG.forward_features` (image → pool5) then :meth:`VGG.forward_head`
(pool5 → dense head output).  Any named layer can be read with :meth:`VGG.forward_layers`.
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
    STRIDE,
    ArchSpec,
    layer_names,
    parse_arch,
    scaled,
)
from .preprocessing import IMAGENET, Preprocessing

PRE = ":pre"


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
            return F.linear(x.flatten(1), self.weight.flatten(1), self.bias)[:, :, None, None]
        return F.conv2d(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        out_f, in_c = self.weight.shape[:2]
        return f"{in_c}, {out_f}, kernel_size={self.kernel_size}"


class VGG(nn.Module):
    """A VGG config of Table 1 (A, A-LRN, B, C, D, E), optionally with batch norm or reduced widths.

    Args:
        arch: ``"A"`` … ``"E"``, ``"A-LRN"`` or an alias (``"vgg16"``, ``"vgg16_bn"``).
        batch_norm: add BatchNorm2d after every conv (torchvision's ``vgg*_bn``).
        num_classes: outputs of fc8.
        width_mult: multiplies every conv width (64 … 512); 1.0 is the paper's net.
        fc_dim: width of fc6 and fc7 (4096 in the paper).
        dropout: dropout probability after fc6 and fc7 (training only).
    """

    def __init__(self, arch: str = "D", *, batch_norm: bool | None = None,
                 num_classes: int = NUM_CLASSES, width_mult: float = 1.0, fc_dim: int = FC_DIM,
                 dropout: float = 0.5) -> None:
        super().__init__()
        if width_mult <= 0 or fc_dim <= 0 or num_classes <= 0:
            raise ValueError("width_mult, fc_dim and num_classes must be positive, got "
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
            fc8=DenseLinear(fc_dim, num_classes, 1)))
        taps.update({"fc6:pre": "fc6", "fc6": "relu6", "fc7:pre": "fc7", "fc7": "relu7",
                     "fc8": "fc8"})
        self.num_classes = num_classes
        self.num_features = in_ch
        self._modules_in_order = [*self.features.named_children(), *self.head.named_children()]
        position = {name: i for i, (name, _) in enumerate(self._modules_in_order)}
        self._taps = {layer: position[module] for layer, module in taps.items()}
        self.feature_info = self._feature_info(taps, in_ch, fc_dim)

    # -- metadata -------------------------------------------------------------------------------

    def _feature_info(self, taps: dict[str, str], pool5_ch: int, fc_dim: int) -> list[dict]:
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
        for name, chs in (("fc6", fc_dim), ("fc7", fc_dim), ("fc8", self.num_classes)):
            info.append({"name": name, "num_chs": chs, "reduction": STRIDE,
                         "module": f"head.{taps[name]}"})
        return info

    @property
    def layer_names(self) -> list[str]:
        """Every name :meth:`forward_layers` accepts, in network order (``:pre`` ones included)."""
        return sorted(self._taps, key=lambda n: (self._taps[n], n)) + ["prob"]

    def check_layer(self, name: str) -> str:
        """Return ``name`` if it is a readable layer; else raise ``ConfigError`` listing them."""
        if name not in self._taps and name != "prob":
            raise ConfigError(f"unknown layer {name!r} for VGG {self.spec.name}; valid layers: "
                             + ", ".join(self.layer_names))
        return name

    def layer_channels(self, name: str) -> int:
        """Channels of a readable layer's output map."""
        base = self.check_layer(name).removesuffix(PRE)
        if base == "prob":
            return self.num_classes
        return next(info["num_chs"] for info in self.feature_info if info["name"] == base)

    # -- forward contract ----------------------------------------------------------------------

    def forward_features(self, x: Tensor) -> Tensor:
        """N×3×H×W normalised image → pool5 map N×C×H/32×W/32."""
        return self.features(x)

    def forward_head(self, x: Tensor, *, pre_logits: bool = False) -> Tensor:
        """pool5 map N×C×h×w (h, w ≥ 7) → dense head output N×K×(h−6)×(w−6).

        K is num_classes (fc8 logits), or fc_dim with ``pre_logits=True`` (fc7 after its ReLU).
        """
        if x.shape[-1] < FC6_KERNEL or x.shape[-2] < FC6_KERNEL:
            raise ValueError(f"pool5 map {tuple(x.shape[-2:])} is smaller than fc6's 7×7 window: "
                             f"the input image must be at least {INPUT_SIZE} px on each side")
        head = self.head[:-1] if pre_logits else self.head
        return head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Crop mode: N×3×224×224 (anything whose pool5 is 7×7) → N×num_classes logits."""
        feats = self.forward_features(x)
        if feats.shape[-2:] != (FC6_KERNEL, FC6_KERNEL):
            raise ValueError(f"crop mode needs a {INPUT_SIZE}×{INPUT_SIZE} input (pool5 7×7); got "
                             f"{tuple(x.shape[-2:])}. Use model.score_map(x) for dense evaluation "
                             "of larger images, or crop/resize to 224 first.")
        return self.forward_head(feats).flatten(1)

    def score_map(self, x: Tensor) -> Tensor:
        """Dense mode: N×3×H×W (H, W ≥ 224) → class score map N×num_classes×(H//32−6)×(W//32−6)."""
        check_dense_input(x)
        return self.forward_head(self.forward_features(x))

    def forward_layers(self, x: Tensor, layers: Iterable[str]) -> dict[str, Tensor]:
        """Read named layers in one pass: ``{"conv5_3": N×512×h×w, "fc7:pre": N×4096×h'×w', …}``.

        A plain name is the value after the ReLU (as Caffe's in-place blobs hold it), ``NAME:pre``
        the value before it, ``prob`` the per-location softmax over fc8.  Head layers need an input
        of at least 224 px; on a 224 input their maps are 1×1.  The pass stops at the deepest
        layer asked for.
        """
        wanted = [self.check_layer(name) for name in layers]
        if not wanted:
            raise ValueError("forward_layers needs at least one layer name")
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


def check_dense_input(x: Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected an N×3×H×W image batch, got shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < INPUT_SIZE:
        raise ValueError(f"dense mode needs images of at least {INPUT_SIZE} px on each side, got "
                         f"{tuple(x.shape[-2:])}; rescale so the smallest side is Q ≥ {INPUT_SIZE}")


def score_map_size(height: int, width: int) -> tuple[int, int]:
    """Spatial size of the dense class score map for an H×W input: (H//32 − 6, W//32 − 6)."""
    return height // STRIDE - (FC6_KERNEL - 1), width // STRIDE - (FC6_KERNEL - 1)
