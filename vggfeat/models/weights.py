"""Where weights come from: the torchvision and timm hubs, files, and vggfeat's own safetensors.

Pretrained weights carry their own preprocessing and metadata, like torchvision's weight enums.
Downloads go through the hubs' own caches (torch hub's ``checkpoints`` folder, the Hugging Face
cache for timm), so a file already there loads offline.  Nothing is ever unpickled beyond plain
tensors: ``.pth`` files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import socket
import threading
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import Tensor

from ..errors import ConfigError, WeightsError
from ..fileio import atomic_path, sha256_file
from .configs import ArchSpec
from .preprocessing import IMAGENET, Preprocessing

OFFLINE_ENV = ("VGGFEAT_OFFLINE", "HF_HUB_OFFLINE")
FORMAT_TAG = "vggfeat"


@dataclass(frozen=True)
class PretrainedWeights:
    """One published set of weights (an entry of :func:`pretrained_table`)."""

    source: str  # "torchvision" or "timm"
    arch: str  # common name, e.g. "vgg16_bn"
    location: str  # URL (torchvision) or Hugging Face repo id (timm)
    preprocessing: Preprocessing = IMAGENET
    meta: dict = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return Path(self.location).name if self.source == "torchvision" else "model.safetensors"


def _torchvision_entries() -> dict[tuple[str, str], PretrainedWeights]:
    from torchvision.models import get_model_weights

    entries = {}
    for name in ("vgg11", "vgg13", "vgg16", "vgg19"):
        for arch in (name, name + "_bn"):
            w = get_model_weights(arch).IMAGENET1K_V1
            meta = {"num_params": w.meta["num_params"], "metrics": w.meta["_metrics"],
                    "recipe": w.meta["recipe"], "eval": "resize 256, center crop 224",
                    "categories": "imagenet-1k", "weights_enum": str(w)}
            entries[(arch, "torchvision")] = PretrainedWeights("torchvision", arch, w.url, meta=meta)
            # timm's tv_in1k checkpoints are torchvision's, re-saved with fc6/fc7 as convs.
            entries[(arch, "timm")] = PretrainedWeights(
                "timm", arch, f"timm/{arch}.tv_in1k", meta={**meta, "timm_tag": f"{arch}.tv_in1k"})
    return entries


@functools.lru_cache(maxsize=1)
def pretrained_table() -> dict[tuple[str, str], PretrainedWeights]:
    """The published weights by (torchvision architecture name, hub), read from torchvision's
    weight enums on first use (importing torchvision takes about a second)."""
    return _torchvision_entries()


def __getattr__(name: str):
    if name == "PRETRAINED":  # the table, built when first asked for
        return pretrained_table()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pretrained_for(spec: ArchSpec, source: str) -> PretrainedWeights:
    key, table = (spec.common_name, source), pretrained_table()
    if key not in table:
        have = sorted({arch for arch, src in table if src == source})
        raise WeightsError(f"no {source} weights exist for VGG {spec.name} ({spec.common_name}); "
                           f"{source} publishes: {', '.join(have)}. Train one with `vggfeat train` "
                           "or pass a weights file.")
    return table[key]


def offline(download: bool = True) -> bool:
    return offline_reason(download) is not None


def offline_reason(download: bool = True) -> str | None:
    """Why downloads are disabled (``download=False`` or an offline variable), else ``None``."""
    if not download:
        return "download=False"
    names = [v for v in OFFLINE_ENV if os.environ.get(v, "") not in ("", "0")]
    return f"{names[0]} is set" if names else None


# Seconds to wait for a hub's server: without a network, the hubs' own clients retry for half a
# minute before their error; one connection attempt tells at once.
PROBE_TIMEOUT = 3.0


def unreachable(url: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why the server of ``url`` (or the proxy the environment names for it) cannot be reached
    now, or ``None`` when a TCP connection to it opens within ``timeout`` seconds."""
    target = urlsplit(url)
    proxy = urllib.request.getproxies().get(target.scheme)
    if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
        target = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"{host} cannot be reached ({err})")

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    return outcome[0] if outcome else f"{host} did not answer within {timeout:g} s"


def offline_choices(place_hub_file: str, option: str = "--weights",
                    keyword: str = "weights") -> str:
    """The ways to run without a network, the hub's own file first; ``option`` and ``keyword``
    are the command-line option and the argument that asked for the hub's weights."""
    return (f"Offline, {place_hub_file}; or pass a local weights file ({option} "
            f"my-vgg.safetensors, or a .pth/.pt state dict); or use {option} random "
            f"({keyword}='random'), an untrained net, to try the pipeline")


class OfflineError(WeightsError):
    """Hub weights that cannot be had without a network.  The message ends with the ways to run
    offline, for the option that asked for the weights (``--weights`` unless
    :meth:`for_option` names another)."""

    def __init__(self, problem: str, place_hub_file: str, option: str = "--weights",
                 keyword: str = "weights") -> None:
        self.problem, self.place_hub_file = problem, place_hub_file
        super().__init__(f"{problem}. {offline_choices(place_hub_file, option, keyword)}")

    def for_option(self, what: str, option: str, keyword: str) -> OfflineError:
        """The same error for weights asked for by ``option`` (``keyword`` in Python), the
        problem prefixed by ``what`` asked for them."""
        return OfflineError(f"{what}: {self.problem}", self.place_hub_file, option, keyword)


def fetch(weights: PretrainedWeights, *, download: bool = True, progress: bool = True) -> Path:
    """Path of the weights file in its hub's cache, downloading it if allowed and needed."""
    if weights.source == "torchvision":
        return _fetch_torch_hub(weights.location, download=download, progress=progress)
    return _fetch_hf_hub(weights.location, weights.filename, download=download)


def _fetch_torch_hub(url: str, *, download: bool, progress: bool) -> Path:
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / Path(url).name
    if path.is_file():
        return path
    place = f"put {path.name} (from {url}) into {folder}/ (TORCH_HOME moves this folder)"
    disabled = offline_reason(download)
    if disabled:
        raise OfflineError(f"{path.name} is not in torch hub's cache and downloads are disabled "
                           f"({disabled})", place)
    problem = unreachable(url)
    if problem:
        raise OfflineError(f"no network: {problem}, and {path.name} is not in torch hub's cache",
                           place)
    folder.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(path.name)
    try:
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None,
                                       progress=progress)
    except Exception as err:  # network errors come in many types; the advice is the same
        raise OfflineError(f"could not download {url} ({err})", place) from err
    return path


def _fetch_hf_hub(repo_id: str, filename: str, *, download: bool) -> Path:
    from huggingface_hub import constants, hf_hub_download

    # Read at call time: huggingface_hub freezes its constants when first imported.
    cache = Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)
    disabled = offline_reason(download)
    # Without a network, a file already in the cache is still used, without the hub's retries.
    problem = None if disabled else unreachable(constants.ENDPOINT)
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache,
                                    local_files_only=bool(disabled or problem)))
    except Exception as err:
        folder = cache / f"models--{repo_id.replace('/', '--')}"
        place = (f"copy the folder {folder.name} from the Hugging Face cache of a machine that "
                 f"has downloaded it into {cache}/ (HF_HUB_CACHE moves this folder), or place the "
                 f"file as {folder}/snapshots/<commit>/{filename} with the commit hash in "
                 f"{folder}/refs/main")
        missing = f"{filename} of {repo_id} is not in the Hugging Face cache"
        if problem:
            raise OfflineError(f"no network: {problem}, and {missing}", place) from err
        if disabled:
            raise OfflineError(f"{missing} and downloads are disabled ({disabled})",
                               place) from err
        raise OfflineError(f"could not get {filename} of {repo_id} ({type(err).__name__}: "
                           f"{err})", place) from err


def read_weights_file(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load a state dict and its metadata from ``.safetensors`` or a plain-tensor ``.pth``/``.pt``.

    Checkpoints that wrap the state dict (``{"state_dict": …}``, ``{"model": …}``) are unwrapped.
    A pickle holding anything but tensors and containers is refused: it could run code.
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"weights file {path} is a folder; give the weights file in it "
                           "(.safetensors, .pth or .pt)")
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            state_dict = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:  # empty, truncated or not safetensors
            raise WeightsError(f"cannot read weights file {path}: it is not a complete .safetensors "
                               f"file ({err}); download or export it again") from err
        _refuse_non_finite(state_dict, path)
        return state_dict, metadata
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive ("PK"), older torch a bare pickle (protocol byte 0x80).
    if head != b"PK" and head[:1] != b"\x80":
        raise WeightsError(f"{path} is not a weights file: expected a .safetensors file, or a "
                           ".pth/.pt state dict written by torch.save")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(
            f"refusing to load {path}: it is a pickle that holds more than tensors, and loading "
            "it could run code. Only plain state dicts are accepted (torch.load weights_only=True "
            f"said: {str(err).splitlines()[0]}). Convert it to .safetensors where you trust it."
        ) from err
    except Exception as err:
        raise WeightsError(f"cannot read weights file {path}: {err}") from err
    for wrapper in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path} does not hold a state dict of tensors (it holds a "
                           f"{type(obj).__name__})")
    other = next((k for k, v in obj.items() if not isinstance(v, Tensor)), None)
    if other is not None:
        raise WeightsError(f"{path} does not hold a state dict of tensors: entry {other!r} is "
                           f"of type {type(obj[other]).__name__}, not a tensor")
    _refuse_non_finite(obj, path)
    return obj, {}


def _refuse_non_finite(state_dict: dict[str, Tensor], path: Path) -> None:
    """NaN or infinite weights turn every output into NaN without any error: refuse them here."""
    for key, value in state_dict.items():
        if not value.is_floating_point():
            continue
        finite = torch.isfinite(value)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(value).sum())
        infinite = value.numel() - int(finite.sum()) - nan
        counts = " and ".join(f"{n} {kind}" for n, kind in ((nan, "NaN"), (infinite, "infinite"))
                              if n)
        raise WeightsError(f"weights file {path}: tensor {key} holds {counts} value(s) (of "
                           f"{value.numel()}), so every output would be NaN; use an earlier "
                           "checkpoint of the run that wrote it, or download or export it again")


def sha256(path: str | os.PathLike) -> str:
    return sha256_file(path).hex()


def save_weights(model, path: str | os.PathLike, *, meta: dict | None = None) -> Path:
    """Write ``model`` as a vggfeat ``.safetensors`` file with JSON metadata.

    The metadata records the architecture (so the file alone rebuilds the net), the
    preprocessing, the provenance of the weights and anything in ``meta`` (recipe, train scale S,
    metrics).  The file is written under a temporary name and renamed, so it is whole or absent.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"vggfeat weight files are .safetensors; got {path}")
    metadata = {"format": FORMAT_TAG, "config": json.dumps(model.config),
                "preprocessing": model.preprocessing.to_json(),
                "meta": json.dumps({**model.weights_meta, **(meta or {})})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path

