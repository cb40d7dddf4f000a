"""The paper's Table 1 as data.

Each config is the sequence of layers between the input and pool5: an ``int`` is a 3×3 conv of
that width, ``(width, 1)`` a 1×1 conv (config C), ``"LRN"`` the AlexNet local response
normalisation (config A-LRN) and ``"M"`` a 2×2 max-pool of stride 2.  Every variant, the paper's
and the reduced-width ones used for small experiments, is built from this one table.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from ..errors import ConfigError

Layer = int | tuple[int, int] | str

CFGS: dict[str, list[Layer]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "A-LRN": [64, "LRN", "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "C": [64, 64, "M", 128, 128, "M", 256, 256, (256, 1), "M", 512, 512, (512, 1), "M",
          512, 512, (512, 1), "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
          512, 512, 512, 512, "M"],
}

# AlexNet's LRN (Krizhevsky et al. 2012), as the paper uses it in A-LRN:
# b_i = a_i / (k + α Σ_{5 neighbours} a_j²)^β with α = 1e-4.  torch's LocalResponseNorm divides
# α by the size, so it gets α·size = 5e-4 to compute the same function.
ALEXNET_LRN = {"size": 5, "alpha": 1e-4, "beta": 0.75, "k": 2.0}
LRN_SETTINGS = {**ALEXNET_LRN, "alpha": ALEXNET_LRN["alpha"] * ALEXNET_LRN["size"]}

FC_DIM = 4096
NUM_CLASSES = 1000
# fc6 sees pool5 as a 7×7 window: 224 / 2**5.
FC6_KERNEL = 7
INPUT_SIZE = 224
STRIDE = 32

ALIASES: dict[str, str] = {
    "a": "A", "vgg11": "A",
    "alrn": "A-LRN", "vgg11lrn": "A-LRN",
    "b": "B", "vgg13": "B",
    "c": "C", "vgg16c": "C", "vgg16conv1": "C",
    "d": "D", "vgg16": "D",
    "e": "E", "vgg19": "E",
}
# The name every library uses for each config (torchvision, timm, Keras), where there is one.
COMMON_NAMES = {"A": "vgg11", "A-LRN": "vgg11_lrn", "B": "vgg13", "C": "vgg16_c", "D": "vgg16",
                "E": "vgg19"}


@dataclass(frozen=True)
class ArchSpec:
    """A resolved architecture: a Table 1 config plus the options that change its shapes."""

    config: str
    batch_norm: bool = False

    @property
    def name(self) -> str:
        return self.config + ("-BN" if self.batch_norm else "")

    @property
    def common_name(self) -> str:
        return COMMON_NAMES[self.config] + ("_bn" if self.batch_norm else "")


def parse_arch(arch: str, *, batch_norm: bool | None = None) -> ArchSpec:
    """Resolve ``"D"``, ``"vgg16"``, ``"vgg16_bn"``, ``"A-LRN"`` … into an :class:`ArchSpec`.

    A ``_bn`` / ``-BN`` suffix selects the batch-norm variant; ``batch_norm=`` may say the same.
    """
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a string such as 'D' or 'vgg16', not {type(arch).__name__}")
    key = re.sub(r"[\s_\-]", "", arch).lower()
    bn = key.endswith("bn")
    if bn:
        key = key[:-2]
    if key not in ALIASES:
        valid = ", ".join(list(CFGS) + list(COMMON_NAMES.values()))
        raise ConfigError(f"unknown VGG arch {arch!r}; valid choices: {valid} "
                          "(add '_bn' for batch norm)")
    if batch_norm is not None and bn and not batch_norm:
        raise ConfigError(f"arch {arch!r} names a batch-norm variant but batch_norm=False was given")
    return ArchSpec(ALIASES[key], batch_norm=bool(batch_norm) or bn)


def scaled(width: int, width_mult: float) -> int:
    """Channel count of a reduced-width variant: at least 1, rounded to the nearest integer."""
    return max(1, int(round(width * width_mult)))


def layer_names(config: str) -> list[tuple[str, Layer]]:
    """Paper/Caffe names of the Table 1 layers, in order: conv1_1 … pool5 (and norm1 in A-LRN)."""
    names: list[tuple[str, Layer]] = []
    block, conv = 1, 0
    for layer in CFGS[config]:
        if layer == "M":
            names.append((f"pool{block}", layer))
            block, conv = block + 1, 0
        elif layer == "LRN":
            names.append((f"norm{block}", layer))
        else:
            conv += 1
            names.append((f"conv{block}_{conv}", layer))
    return names


PRE = ":pre"  # suffix of a layer name read before its ReLU
HEAD_LAYERS = ("fc6" + PRE, "fc6", "fc7" + PRE, "fc7", "fc8", "prob")


def readable_layers(config: str) -> list[str]:
    """Every layer name a net of ``config`` can read out, in network order (``:pre`` ones
    included, fc8 and prob for a net with a classifier)."""
    names: list[str] = []
    for name, layer in layer_names(config):
        names += [name] if layer in ("M", "LRN") else [name + PRE, name]
    return names + list(HEAD_LAYERS)


def unknown_layer(name: str, valid: list[str], arch: str | None = None) -> ConfigError:
    """The error for a layer name that is not in ``valid``: the closest name when one is close
    (``FC7`` → ``fc7``), else every valid name."""
    lowered = {v.lower(): v for v in valid}
    close = ([lowered[name.lower()]] if name.lower() in lowered
             else difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6))
    where = f" for VGG {arch}" if arch else ""
    if close:
        best = lowered.get(close[0], close[0])
        return ConfigError(f"unknown layer {name!r}{where}; did you mean {best!r}? (vggfeat info "
                           f"--arch {arch or 'D'} lists every layer)")
    return ConfigError(f"unknown layer {name!r}{where}; valid layers: " + ", ".join(valid))


def _network_order(name: str) -> tuple:
    """Sort key placing the layer names of all configs together in network order."""
    if name in HEAD_LAYERS:
        return (6, 0, HEAD_LAYERS.index(name))
    kind, block, conv = re.fullmatch(r"(conv|norm|pool)(\d)(?:_(\d))?", name.removesuffix(PRE)
                                     ).groups()
    rank = {"conv": 0, "norm": 1, "pool": 2}[kind]
    return (int(block), rank, 2 * int(conv or 0) + (not name.endswith(PRE)))


def check_layer_name(name: str, arch: str | None = None) -> str:
    """Return ``name`` if a net of ``arch`` (any config when None) can read it; else raise
    :class:`ConfigError` suggesting the closest name.  Needs no network, so the command line
    checks ``--layer`` with it before loading one."""
    spec = parse_arch(arch) if arch else None
    valid = (readable_layers(spec.config) if spec else
             sorted({n for c in CFGS for n in readable_layers(c)}, key=_network_order))
    if name not in valid:
        raise unknown_layer(name, valid, spec.name if spec else None)
    return name
