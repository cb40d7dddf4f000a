"""``vggfeat extract``: descriptors for a list of images into a resumable HDF5 cache.

Decoding and rescaling run in DataLoader workers, overlapped with the network.  Results are
published in shards (see :mod:`vggfeat.cache.store`), so a run killed at any moment, SIGKILL
included, resumes where it stopped when the same command is run again.  Under ``torchrun`` the
images not yet done are split between the ranks in contiguous blocks, with no padding; rank 0
joins the shards into the one output file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import __version__
from ..cache.store import (
    CacheError,
    covered,
    load_features,
    merge,
    parts_dir,
    read_attrs,
    read_manifest,
    read_shards,
    settings_difference,
    write_json_atomic,
    write_shard,
)
from ..data.loader import image_loader
from ..data.sources import ImageList, gather_images
from ..distributed import Distributed
from ..errors import ExtractError
from ..models.factory import vgg
from ..models.vgg import VGG
from .descriptor import DescriptorNet, DescriptorSpec, prepare

DTYPES = ("float32", "float16")
# Settings that must agree for descriptors to be comparable (and, with the inputs, for a run to
# continue another's work or to count as up to date).
DESCRIPTOR_SETTINGS = ("arch", "model_config", "weights", "weights_sha256", "preprocessing", "layer",
                       "scales", "pool", "aggregate", "flip", "l2", "crop", "max_aspect", "dtype")
COMPARED = DESCRIPTOR_SETTINGS + ("input_fingerprint", "num_inputs")


@dataclass
class ExtractResult:
    output: Path
    num_images: int
    num_failed: int
    computed: int  # images computed by this invocation (all ranks)
    seconds: float
    failed: list[tuple[str, str]] = field(default_factory=list)
    up_to_date: bool = False


class _ShardBuffer:
    """Rows waiting to be published; flushed by count or by age so little is ever at risk."""

    def __init__(self, parts: Path, rank: int, dim: int, n_scales: int, dtype: str,
                 max_images: int, max_seconds: float) -> None:
        self.parts, self.rank, self.dim, self.n_scales, self.dtype = parts, rank, dim, n_scales, dtype
        self.max_images, self.max_seconds = max_images, max_seconds
        self._reset()

    def _reset(self) -> None:
        self.index, self.rows, self.sizes, self.failed, self.reasons = [], [], [], [], []
        self.started = time.monotonic()

    def add(self, index: list[int], rows: np.ndarray, sizes: np.ndarray) -> None:
        self.index.extend(index)
        self.rows.append(rows)
        self.sizes.append(sizes)

    def add_failure(self, index: int, reason: str) -> None:
        self.failed.append(index)
        self.reasons.append(reason)

    def maybe_flush(self) -> None:
        pending = len(self.index) + len(self.failed)
        if pending >= self.max_images or (pending and time.monotonic() - self.started
                                          >= self.max_seconds):
            self.flush()

    def flush(self) -> None:
        if not self.index and not self.failed:
            return
        order = np.argsort(self.index)
        write_shard(self.parts, rank=self.rank, index=np.asarray(self.index, np.int64)[order],
                    features=(np.concatenate(self.rows) if self.rows
                              else np.empty((0, self.dim)))[order],
                    input_sizes=(np.concatenate(self.sizes) if self.sizes
                                 else np.empty((0, self.n_scales, 2)))[order],
                    failed_index=np.asarray(self.failed, np.int64), failed_reasons=self.reasons,
                    dtype=self.dtype)
        self._reset()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def extract(inputs: list[str | os.PathLike] | ImageList, output: str | os.PathLike, *,
            spec: DescriptorSpec = DescriptorSpec(), model: VGG | None = None, arch: str | None = None,
            weights: str | None = "torchvision", batch_size: int = 8, workers: int | None = None,
            device: str | None = None, dtype: str = "float32", amp: str | None = None,
            overwrite: bool = False, strict: bool = False, progress: bool = True,
            shard_images: int = 256, shard_seconds: float = 60.0,
            download: bool = True) -> ExtractResult:
    """Compute ``spec`` descriptors of every input image and store them in ``output`` (HDF5).

    Args:
        inputs: folders, image files, ``.txt``/``.csv`` lists, or an :class:`ImageList`.
        output: the ``.h5`` file to write; an unfinished run keeps its work in ``OUTPUT.parts/``.
        spec: the descriptor (layer, scales, pooling, flip, aggregation, L2, crop).
        model, arch, weights: the net, or how to build it (:func:`vggfeat.vgg`).
        batch_size: images per forward pass (flips double it).
        workers: DataLoader worker processes for decoding (default: half the cores, ≤ 8).
        device: ``cpu``, ``cuda``, ``cuda:1`` … (default: cuda when available).
        dtype: stored precision, ``float32`` or ``float16``.
        amp: ``bf16``/``fp16`` autocast for the network (GPU).
        overwrite: replace an existing output or unfinished run made with other settings.
        strict: stop at the first unreadable image instead of recording it.
        shard_images, shard_seconds: publish results at least this often (crash-safety grain).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    start = time.monotonic()
    images = inputs if isinstance(inputs, ImageList) else gather_images(list(inputs))
    output = Path(output)
    parts = parts_dir(output)
    dist = Distributed.from_env(device or default_device())
    if model is None:
        model = vgg(arch, weights=weights, download=download, progress=progress and dist.is_main)
    net = DescriptorNet(model, spec, device=dist.device, batch_size=batch_size, amp=amp)
    settings = _settings(model, spec, images, dtype)

    if dist.is_main:
        up_to_date = _prepare_output(output, parts, settings, overwrite)
    else:
        up_to_date = False
    if dist.broadcast_flag(up_to_date):
        attrs = read_attrs(output)
        return ExtractResult(output, attrs["num_images"], attrs["num_failed"], 0,
                             time.monotonic() - start, up_to_date=True)
    dist.barrier()
    done = covered(read_shards(parts))
    remaining = np.setdiff1d(np.arange(len(images)), done)
    mine = np.array_split(remaining, dist.world_size)[dist.rank]
    dist.barrier()  # every rank has listed the shards before any rank adds one

    buffer = _ShardBuffer(parts, dist.rank, net.dim, len(spec.scales), dtype, shard_images,
                          shard_seconds)
    loader = image_loader(images.paths, mine, partial(prepare, spec=spec), batch_size=batch_size,
                          workers=default_workers() if workers is None else workers,
                          pin_memory=dist.device.type == "cuda")
    bar = tqdm(total=len(mine), unit="img", disable=not (progress and dist.is_main),
               desc=f"extract {spec.layer}" + (f" rank 0/{dist.world_size}" if dist.world_size > 1
                                                else ""), dynamic_ncols=True)
    failures = 0
    try:
        for batch in loader:
            good = [(index, views) for index, views, _ in batch if views is not None]
            for index, _, reason in batch:
                if reason is not None:
                    failures += 1
                    if strict:
                        raise ExtractError(f"{images.paths[index]}: {reason} (--strict stops at "
                                           "the first bad image; without it, bad images are "
                                           "recorded and skipped)")
                    buffer.add_failure(index, reason)
            if good:
                rows = net([views for _, views in good]).numpy()
                sizes = np.array([[v.shape[-2:] for v in views] for _, views in good])
                buffer.add([index for index, _ in good], rows, sizes)
            buffer.maybe_flush()
            bar.update(len(batch))
            bar.set_postfix(failed=failures, refresh=False)
    finally:
        buffer.flush()  # whatever was computed is kept, even when stopping on an error
        bar.close()
    dist.barrier()
    if dist.is_main:
        merge(parts, output, paths=images.paths, labels=images.labels,
              class_names=images.class_names, attrs=_file_attrs(settings, model, spec),
              dim=net.dim, n_scales=len(spec.scales), dtype=dtype)
    dist.barrier()
    attrs = read_attrs(output)
    failed = load_features(output).failed if attrs["num_failed"] else []
    return ExtractResult(output, attrs["num_images"], attrs["num_failed"], len(remaining),
                         time.monotonic() - start, failed)


def descriptor_settings(model: VGG, spec: DescriptorSpec, dtype: str) -> dict:
    """What makes two descriptors comparable: the net, its weights, the descriptor, the dtype."""
    meta = model.weights_meta
    return {"arch": model.spec.name, "model_config": json.dumps(model.config, sort_keys=True),
            "weights": meta.get("name") or meta.get("file") or meta.get("source", "random"),
            "weights_sha256": meta.get("sha256", ""),
            "preprocessing": model.preprocessing.to_json(), **spec.to_attrs(), "dtype": dtype}


def _settings(model: VGG, spec: DescriptorSpec, images: ImageList, dtype: str) -> dict:
    return {**descriptor_settings(model, spec, dtype), "input_fingerprint": images.fingerprint(),
            "num_inputs": len(images)}


def _file_attrs(settings: dict, model: VGG, spec: DescriptorSpec) -> dict:
    return {**settings, "weights_source": model.weights_meta.get("source", "random"),
            "vggfeat_version": __version__, "torch_version": str(torch.__version__),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "complete": True}


def _comparable(attrs: dict) -> dict:
    return {k: attrs.get(k) for k in COMPARED}


def _prepare_output(output: Path, parts: Path, settings: dict, overwrite: bool) -> bool:
    """Check an existing output and unfinished run against ``settings``; True if up to date."""
    wanted = _comparable(settings)
    if output.exists() and not overwrite:
        try:
            existing = _comparable(read_attrs(output))
        except OSError as err:
            raise CacheError(f"{output} exists but is not a readable HDF5 file ({err}); "
                             "use --overwrite to replace it") from err
        if existing == wanted:
            return True
        raise CacheError(f"{output} exists and was written with different settings or inputs ("
                         + "; ".join(settings_difference(existing, wanted)) + "). It is never "
                         "appended to: use --overwrite to replace it, or choose another output")
    manifest = read_manifest(parts)
    if manifest is not None and _comparable(manifest) != wanted:
        if not overwrite:
            raise CacheError(f"{parts} holds an unfinished run with different settings or inputs ("
                             + "; ".join(settings_difference(_comparable(manifest), wanted))
                             + "): use --overwrite to discard it, or rerun with its settings")
        manifest = None
    if manifest is None:
        shutil.rmtree(parts, ignore_errors=True)
        output.parent.mkdir(parents=True, exist_ok=True)
        parts.mkdir(parents=True)
        write_json_atomic(parts / "manifest.json", settings)
    return False
