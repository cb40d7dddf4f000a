"""``vggfeat train``: the paper's SGD training, on one device or many (torchrun), resumable.

One optimiser step sees the global batch (``recipe.batch_size``): it is split evenly between the
processes, and each process reaches its share by gradient accumulation over micro-batches, so
the update does not depend on how many GPUs there are.  The run folder holds:

* ``checkpoints/last.pt``: model, optimiser, scheduler, position (epoch, step) and history, written atomically every few minutes and at each epoch's end; ``--resume`` continues
  from it and ends with the same weights as an uninterrupted run;
* ``best.safetensors`` (lowest validation top-1 error) and ``final.safetensors``, vggfeat weight
  files with the recipe, S and metrics, readable by ``vggfeat extract`` and ``vggfeat evaluate``;
* ``recipe.yaml``, ``metrics.csv``, ``curves.png``, ``tensorboard/``, ``skipped.tsv``.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..data.sources import ImageList
from ..distributed import Distributed
from ..errors import TrainingError
from ..evaluate.run import evaluate
from ..extract.run import default_device, default_workers
from ..models.factory import vgg
from ..models.runner import AMP_DTYPES
from ..models.vgg import VGG
from ..models.weights import save_weights
from .augment import DROPOUT_STREAM, derived_seed, pca_lighting, train_transform
from .data import TrainImages, epoch_order, micro_batches, train_loader, training_data
from .logs import RunLog
from .recipe import Recipe, RecipeError, save_recipe

CHECKPOINT = Path("checkpoints") / "last.pt"
# Recipe fields that change the maths: a resumed run must agree on them.
RESUME_FIXED = ("arch", "batch_norm", "width_mult", "fc_dim", "train_scale", "init",
                "init_from_a", "weights", "batch_size", "lr", "momentum", "weight_decay",
                "dropout", "lr_factor", "lr_drops", "patience", "crop", "flip", "lighting",
                "preprocessing", "seed")


@dataclass
class TrainResult:
    run_dir: Path
    final: Path | None
    history: list[dict] = field(default_factory=list)
    global_step: int = 0
    skipped: int = 0
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step run here


@dataclass
class _State:
    epoch: int = 0
    step: int = 0  # next step within ``epoch``
    global_step: int = 0
    best_top1_error: float = math.inf
    skipped: int = 0
    history: list[dict] = field(default_factory=list)
    epoch_loss: float = 0.0  # loss sum and images of the epoch so far: its mean survives resume
    epoch_images: int = 0


def build_model(recipe: Recipe, num_classes: int, *, download: bool = True) -> VGG:
    """The net a recipe starts from: fresh (``init``), pre-initialised from A, or ``weights``."""
    return vgg(recipe.arch, weights=recipe.weights, batch_norm=recipe.batch_norm or None,
               num_classes=num_classes, width_mult=recipe.width_mult, fc_dim=recipe.fc_dim,
               dropout=recipe.dropout, init=recipe.init, seed=recipe.seed,
               init_from_a=recipe.init_from_a, preprocessing=recipe.preprocessing,
               download=download)


def make_optimizer(model: VGG, recipe: Recipe) -> torch.optim.SGD:
    """SGD with momentum; weight decay on weights, not on biases and batch-norm parameters."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=recipe.lr, momentum=recipe.momentum)


def make_scheduler(optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    """lr × ``lr_factor`` when validation top-1 error stalls for ``patience`` epochs, at most
    ``lr_drops`` times (the floor sits just below the last allowed value)."""
    floor = recipe.lr * recipe.lr_factor ** recipe.lr_drops
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=recipe.lr_factor, patience=recipe.patience,
        min_lr=floor * (1 - 1e-6), eps=floor * 1e-3)


def train(recipe: Recipe, data: str | os.PathLike, out: str | os.PathLike, *,
          device: str | None = None, resume: bool = False, devkit: str | None = None,
          labels_csv: str | None = None, max_steps: int | None = None, progress: bool = True,
          download: bool = True) -> TrainResult:
    """Train ``recipe`` on ``data`` (``train/`` and ``val/``) into the run folder ``out``.

    ``max_steps`` stops after that many optimiser steps in all (benchmarks, smoke tests); the
    checkpoint then lets ``resume`` go on.
    """
    dist = Distributed.from_env(device or default_device())
    run_dir = Path(out)
    last = run_dir / CHECKPOINT
    if last.exists() and not resume:
        raise RecipeError(f"{run_dir} already holds a run ({last}); pass --resume to continue "
                          "it, or choose another --out")
    train_set, val_set = training_data(data, devkit=devkit, labels_csv=labels_csv)
    world, batch = dist.world_size, recipe.batch_size
    if batch % world:
        raise RecipeError(f"batch_size {batch} must be divisible by the {world} processes")
    share = batch // world
    micro = min(recipe.micro_batch or share, share)
    if share % micro:
        raise RecipeError(f"micro_batch {micro} must divide the per-process batch {share}")
    steps_per_epoch = len(train_set) // batch
    if steps_per_epoch == 0:
        raise RecipeError(f"batch_size {batch} is larger than the {len(train_set)} training images")

    model = build_model(recipe, len(train_set.class_names), download=download)
    channels_last = recipe.channels_last if recipe.channels_last is not None else \
        dist.device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(dist.device, memory_format=memory_format)
    optimizer = make_optimizer(model, recipe)
    scheduler = make_scheduler(optimizer, recipe)
    amp_dtype = AMP_DTYPES[recipe.amp]
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp_dtype is torch.float16)
    state = _State()
    if resume and last.exists():
        state = _load_checkpoint(last, recipe, model, optimizer, scheduler, scaler, dist)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
    dist.barrier()
    net = DistributedDataParallel(model, device_ids=[dist.device] if dist.device.type == "cuda"
                                  else None) if world > 1 else model
    forward = torch.compile(net) if recipe.compile else net
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    dataset = TrainImages(train_set.paths, train_transform(recipe.scale_range, crop=recipe.crop,
                                                           flip=recipe.flip),
                          seed=recipe.seed, lighting=recipe.lighting)
    labels = np.asarray(train_set.labels)
    workers = default_workers() if recipe.workers is None else recipe.workers
    log = RunLog(run_dir, enabled=dist.is_main)
    accum = share // micro
    last_save = time.monotonic()
    result = TrainResult(run_dir, None)
    stopped = False  # by max_steps
    try:
        while state.epoch < recipe.epochs and not stopped:
            epoch = state.epoch
            batches = micro_batches(epoch_order(len(train_set), seed=recipe.seed, epoch=epoch),
                                    epoch=epoch, first_step=state.step, batch_size=batch,
                                    rank=dist.rank, world_size=world, micro_batch=micro)
            loader = iter(train_loader(dataset, labels, batches, workers=workers,
                                       pin_memory=dist.device.type == "cuda"))
            model.train()
            bar = tqdm(total=steps_per_epoch, initial=state.step, unit="step",
                       disable=not (progress and dist.is_main), dynamic_ncols=True,
                       desc=f"epoch {epoch + 1}/{recipe.epochs}")
            started, done_before = time.monotonic(), state.epoch_images
            while state.step < steps_per_epoch:
                tic = time.monotonic()
                # Dropout's stream is a function of (seed, rank, step): nothing to save or restore.
                torch.manual_seed(derived_seed(recipe.seed, DROPOUT_STREAM, dist.rank,
                                               state.global_step))
                loss_sum, images, failed = _step(forward, net, model, optimizer, scaler, loader,
                                                 accum, amp_dtype, memory_format, dist)
                if failed:
                    state.skipped += len(failed)
                    with open(run_dir / f"skipped-rank{dist.rank}.tsv", "a") as f:
                        f.writelines(f"{train_set.paths[i]}\t{reason}\n" for i, reason in failed)
                if not math.isfinite(loss_sum):
                    raise TrainingError(
                        f"the training loss is {loss_sum / max(images, 1)} at epoch {epoch + 1}, "
                        f"step {state.step + 1} (lr {optimizer.param_groups[0]['lr']:g}); "
                        f"stopped before updating. The last good checkpoint {last} is intact: "
                        "lower --lr (or check the data) and run again with --resume")
                scaler.step(optimizer)
                scaler.update()
                state.step += 1
                state.global_step += 1
                state.epoch_loss += loss_sum
                state.epoch_images += images
                result.step_seconds.append(time.monotonic() - tic)
                rate = images / max(result.step_seconds[-1], 1e-9)
                bar.update()
                bar.set_postfix(loss=f"{loss_sum / max(images, 1):.3f}", img_s=f"{rate:.0f}",
                                refresh=False)
                if state.global_step % 10 == 0:
                    log.step(state.global_step, loss_sum / max(images, 1),
                             optimizer.param_groups[0]["lr"], rate)
                due = (recipe.checkpoint_steps and state.step % recipe.checkpoint_steps == 0) or \
                    time.monotonic() - last_save > 60 * recipe.checkpoint_minutes
                if dist.broadcast_flag(bool(due)) and state.step < steps_per_epoch:
                    _save_checkpoint(last, recipe, model, optimizer, scheduler, scaler, state, dist)
                    last_save = time.monotonic()
                if max_steps is not None and state.global_step >= max_steps:
                    stopped = True
                    break
            bar.close()
            if stopped:
                _save_checkpoint(last, recipe, model, optimizer, scheduler, scaler, state, dist)
                break
            seconds = time.monotonic() - started
            top1, top5 = _validate(model, val_set, recipe, dist, workers)
            scheduler.step(top1)
            row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                   "train_loss": state.epoch_loss / max(state.epoch_images, 1),
                   "val_top1_error": top1, "val_top5_error": top5,
                   "images_per_s": (state.epoch_images - done_before) / max(seconds, 1e-9),
                   "skipped_images": state.skipped, "seconds": seconds}
            state.history.append(row)
            state.epoch, state.step, state.epoch_loss, state.epoch_images = epoch + 1, 0, 0.0, 0
            if dist.is_main:
                log.epoch(state.history)
                if top1 < state.best_top1_error:
                    _export(model, recipe, run_dir / "best.safetensors", row, train_set.class_names)
            state.best_top1_error = min(state.best_top1_error, top1)
            _save_checkpoint(last, recipe, model, optimizer, scheduler, scaler, state, dist)
            last_save = time.monotonic()
        if dist.is_main and not stopped:
            result.final = _export(model, recipe, run_dir / "final.safetensors",
                                   state.history[-1] if state.history else {},
                                   train_set.class_names)
        dist.barrier()
    finally:
        log.close()
    result.history, result.global_step, result.skipped = state.history, state.global_step, \
        state.skipped
    return result


def _step(forward, net, model, optimizer, scaler, loader, accum, amp_dtype, memory_format,
          dist: Distributed) -> tuple[float, int, list[tuple[int, str]]]:
    """Gradients of one global batch, accumulated over micro-batches.

    Returns the global loss sum and image count (over all ranks) and this rank's skipped images.
    """
    optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(2, dtype=torch.float64, device=dist.device)
    failed = []
    for k in range(accum):
        batch = next(loader)
        failed += batch.failed
        sync = nullcontext() if dist.world_size == 1 or k == accum - 1 else net.no_sync()
        with sync:
            if len(batch.labels):
                x = batch.images.to(dist.device, non_blocking=True).float()
                x = pca_lighting(x, batch.alphas.to(dist.device))
                x = model.preprocessing(x).contiguous(memory_format=memory_format)
                y = batch.labels.to(dist.device, non_blocking=True)
                with torch.autocast(dist.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = forward(x)
                loss = F.cross_entropy(logits.float(), y)
                totals += torch.stack([loss.detach().double() * len(y),
                                       torch.tensor(len(y), dtype=torch.float64, device=dist.device)])
            else:  # every image of this micro-batch was unreadable: still take part in the sync
                loss = sum(p.sum() for p in model.parameters()) * 0.0
            scaler.scale(loss / accum).backward()
    dist.all_reduce_sum(totals)
    loss_sum, images = totals.tolist()
    return loss_sum, int(images), failed


def _validate(model: VGG, val_set: ImageList, recipe: Recipe, dist: Distributed, workers: int
              ) -> tuple[float, float]:
    """Top-1/top-5 error (%) on rank 0, shared with every rank (the scheduler needs it)."""
    errors = torch.zeros(2, dtype=torch.float64, device=dist.device)
    if dist.is_main:
        images = val_set
        if recipe.val_limit and recipe.val_limit < len(val_set):
            keep = np.linspace(0, len(val_set) - 1, recipe.val_limit).round().astype(int)
            images = ImageList([val_set.paths[i] for i in keep],
                               [val_set.labels[i] for i in keep], val_set.class_names)
        lo, hi = recipe.scale_range
        q = recipe.val_scale or (lo if lo == hi else 384)
        result = evaluate(images, model, method=recipe.val_method, scales=(q,),
                          batch_size=max(1, (recipe.micro_batch or recipe.batch_size) // 2),
                          workers=workers, device=str(dist.device), amp=recipe.amp,
                          progress=False)
        errors += torch.tensor([result.top1_error, result.top5_error], dtype=torch.float64,
                               device=dist.device)
    dist.all_reduce_sum(errors)  # only rank 0 added anything: this is a broadcast
    model.train()
    top1, top5 = errors.tolist()
    return top1, top5


def _export(model: VGG, recipe: Recipe, path: Path, metrics: dict, class_names: list[str]
            ) -> Path:
    return save_weights(model, path, meta={"train_scale": recipe.scale_label,
                                           "recipe": recipe.to_dict(), "metrics": metrics,
                                           "class_names": class_names,
                                           "trained_with": "vggfeat train"})


def _save_checkpoint(path: Path, recipe: Recipe, model: VGG, optimizer, scheduler, scaler,
                     state: _State, dist: Distributed) -> None:
    """Rank 0 writes the whole training state under a temporary name, then renames it."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise TrainingError(f"the weights are no longer finite after step {state.global_step}; "
                            f"not overwriting the last good checkpoint {path}. Lower --lr and run "
                            "again with --resume")
    if dist.is_main:
        checkpoint = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "recipe": recipe.to_dict(), "world_size": dist.world_size,
            "epoch": state.epoch, "step": state.step, "global_step": state.global_step,
            "best_top1_error": state.best_top1_error, "skipped": state.skipped,
            "epoch_loss": state.epoch_loss, "epoch_images": state.epoch_images,
            "history": json.dumps(state.history)}
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(checkpoint, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    dist.barrier()


def _load_checkpoint(path: Path, recipe: Recipe, model: VGG, optimizer, scheduler, scaler,
                     dist: Distributed) -> _State:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    saved = checkpoint["recipe"]
    current = recipe.to_dict()
    changed = [f"{k}: {saved.get(k)!r} → {current[k]!r}" for k in RESUME_FIXED
               if saved.get(k) != current[k]]
    if changed:
        raise RecipeError(f"{path} was trained with other settings ({'; '.join(changed)}); resume "
                          "with the same recipe, or start a new run in another --out")
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    scaler.load_state_dict(checkpoint["scaler"])
    return _State(epoch=checkpoint["epoch"], step=checkpoint["step"],
                  global_step=checkpoint["global_step"],
                  best_top1_error=checkpoint["best_top1_error"], skipped=checkpoint["skipped"],
                  history=json.loads(checkpoint["history"]), epoch_loss=checkpoint["epoch_loss"],
                  epoch_images=checkpoint["epoch_images"])
