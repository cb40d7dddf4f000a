"""``vggfeat train``: the paper's SGD training, on one device or many (torchrun), resumable.

One optimiser step sees the global batch (``recipe.batch_size``): it is split evenly between the
processes, and each process reaches its share by gradient accumulation over micro-batches, so
the update does not depend on how many GPUs there are.  The run folder holds:

* ``checkpoints/last.pt`` (:mod:`.checkpoint`): model, optimiser, scheduler, loss scaler,
  position (epoch, step) and history, written atomically every few minutes and at each epoch's
  end; ``--resume`` continues from it and ends with the same weights as an uninterrupted run;
* ``best.safetensors`` (lowest value of the task's first metric, the validation top-1 error for
  classification) and ``final.safetensors``, vggfeat weight
  files with the recipe, S and metrics, readable by ``vggfeat extract`` and ``vggfeat evaluate``;
* ``recipe.yaml``, ``metrics.csv``, ``curves.png``, ``tensorboard/``, ``skipped-rank*.tsv``.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..data.sources import ImageList
from ..devices import default_device, default_workers
from ..distributed import Distributed
from ..errors import ConfigError, TrainingError
from ..models.runner import AMP_DTYPES, cudnn_benchmark, tf32_matmuls
from ..models.vgg import VGG
from ..models.weights import save_weights
from .augment import DROPOUT_STREAM, derived_seed, pca_lighting, train_transform
from .checkpoint import CHECKPOINT, Checkpointer, TrainState
from .data import Batch, TrainImages, epoch_order, micro_batches, train_loader
from .logs import RunLog
from .model import make_optimizer, make_scheduler, recipe_for_net
from .recipe import Recipe, RecipeError, load_run_recipe, save_recipe
from .task import ImageClassification, Task

# The loss stays on the device and is read (one host sync) every this many steps, at
# checkpoints and at epoch ends; every step's value still reaches the logs.
LOSS_READ_STEPS = 10


@dataclass
class TrainResult:
    run_dir: Path
    final: Path | None
    history: list[dict] = field(default_factory=list)
    global_step: int = 0
    skipped: int = 0
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step run here


def train(recipe: Recipe | None, data: str | os.PathLike | Task, out: str | os.PathLike, *,
          device: str | None = None, resume: bool = False, devkit: str | None = None,
          labels_csv: str | None = None, max_steps: int | None = None, progress: bool = True,
          download: bool = True) -> TrainResult:
    """Train ``recipe`` on ``data`` into the run folder ``out``.

    ``data`` is a folder with ``train/`` and ``val/`` (image classification, see
    :func:`training_data`; ``devkit``/``labels_csv`` label a flat ImageNet val folder), or a
    :class:`Task` for other targets.  ``recipe`` None with ``resume`` continues with the run's own
    recipe.  ``max_steps`` stops after that many optimiser steps in all (benchmarks, smoke
    tests); the checkpoint then lets ``resume`` go on.
    """
    task = data if isinstance(data, Task) else \
        ImageClassification.from_folders(data, devkit=devkit, labels_csv=labels_csv)
    run_dir = Path(out)
    if recipe is None:
        if not resume:
            raise RecipeError("a new run needs a recipe")
        recipe = load_run_recipe(run_dir, task.recipe_class)
    dist = Distributed.from_env(device or default_device())
    with ExitStack() as scope:
        if dist.device.type == "cuda":
            # Training crops have one shape: let cuDNN pick its fastest kernels, and give
            # float32 matmuls tensor cores; both are restored when the run ends.
            scope.enter_context(cudnn_benchmark(True))
            scope.enter_context(tf32_matmuls(True))
        trainer = _Trainer(recipe, task, run_dir, dist, resume=resume, progress=progress,
                           download=download)
        scope.callback(trainer.log.close)
        return trainer.run(max_steps)


def resolved_amp(recipe: Recipe, device: torch.device) -> str | None:
    """``amp`` None means bf16 autocast on GPUs (bf16 keeps float32's range: no loss scaling)
    and float32 elsewhere."""
    if recipe.amp is None:
        return "bf16" if device.type == "cuda" else None
    return None if recipe.amp == "fp32" else recipe.amp


class _Trainer:
    """One run: the net, its optimiser and the loop's state, and the steps of the loop."""

    def __init__(self, recipe: Recipe, task: Task, run_dir: Path, dist: Distributed, *,
                 resume: bool, progress: bool, download: bool) -> None:
        self.task, self.run_dir, self.dist, self.progress = task, run_dir, dist, progress
        _check_run(recipe, task, run_dir, resume=resume)
        self.micro, self.accum = _micro_batching(recipe, dist.world_size)
        self.steps_per_epoch = len(task.train_set) // recipe.batch_size
        model = task.build_model(recipe, download=download)
        self.recipe = recipe = recipe_for_net(recipe, model)  # records what the weights hold
        self.memory_format = _memory_format(recipe, dist)
        self.model = _place(model, recipe, dist, self.memory_format)
        self.optimizer = make_optimizer(self.model, recipe)
        self.scheduler = make_scheduler(self.optimizer, recipe)
        self.amp = resolved_amp(recipe, dist.device)
        self.amp_dtype = AMP_DTYPES[self.amp]
        self.scaler = torch.amp.GradScaler(dist.device.type,
                                           enabled=self.amp_dtype is torch.float16)
        self.checkpoints = Checkpointer(run_dir, recipe, dist)
        self.state = self.checkpoints.load(**self._stateful()) \
            if resume and self.checkpoints.exists() else TrainState()
        if dist.is_main:
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, run_dir / "recipe.yaml")
        dist.barrier()
        self.net = DistributedDataParallel(
            self.model, device_ids=[dist.device] if dist.device.type == "cuda" else None) \
            if dist.world_size > 1 else self.model
        self.forward = torch.compile(self.net) if recipe.compile else self.net
        self.dataset = TrainImages(task.train_set.paths,
                                   train_transform(recipe.scale_range, crop=recipe.crop,
                                                   flip=recipe.flip),
                                   task.sample, seed=recipe.seed, lighting=recipe.lighting)
        self.workers = default_workers() if recipe.workers is None else recipe.workers
        self.log = RunLog(run_dir, metrics=task.metrics, enabled=dist.is_main)
        # (loss sum on the device, images, unreadable images, global step) of each step not yet
        # read on the host
        self.pending: list[tuple[Tensor, int, int, int]] = []
        self.read_at = time.monotonic()
        self.bar: tqdm | None = None
        # When the current epoch's steps started here, and the images it had counted by then
        # (a resumed epoch's images/s counts only the images trained since).
        self.epoch_started, self.images_before = time.monotonic(), self.state.epoch_images

    def _stateful(self) -> dict:
        """The objects whose state the checkpoint holds, by the names it holds them under."""
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "scaler": self.scaler}

    # -- the loop ----------------------------------------------------------------------------

    def run(self, max_steps: int | None) -> TrainResult:
        state, result = self.state, TrainResult(self.run_dir, None)
        finished_before = state.epoch >= self.recipe.epochs
        while state.epoch < self.recipe.epochs:
            if not self._epoch(max_steps, result.step_seconds):
                self._save_checkpoint()  # stopped by max_steps
                break
            self._end_epoch()
        else:
            final = self.run_dir / "final.safetensors"
            if finished_before and final.is_file():
                result.final = final  # resuming a finished run leaves its export byte for byte
            elif self.dist.is_main:
                result.final = self._export(final.name, state.history[-1] if state.history else {})
        self.dist.barrier()
        result.history, result.global_step, result.skipped = state.history, state.global_step, \
            state.skipped
        return result

    def _epoch(self, max_steps: int | None, step_seconds: list[float]) -> bool:
        """Train the rest of the current epoch; False if ``max_steps`` stopped it."""
        state, recipe, dist = self.state, self.recipe, self.dist
        batches = micro_batches(epoch_order(len(self.task.train_set), seed=recipe.seed,
                                            epoch=state.epoch),
                                epoch=state.epoch, first_step=state.step,
                                batch_size=recipe.batch_size, rank=dist.rank,
                                world_size=dist.world_size, micro_batch=self.micro)
        loader = iter(train_loader(self.dataset, batches, workers=self.workers,
                                   pin_memory=dist.device.type == "cuda"))
        self.model.train()
        self.bar = tqdm(total=self.steps_per_epoch, initial=state.step, unit="step",
                        disable=not (self.progress and dist.is_main), dynamic_ncols=True,
                        desc=f"epoch {state.epoch + 1}/{recipe.epochs}")
        self.epoch_started, self.images_before = time.monotonic(), state.epoch_images
        try:
            while state.step < self.steps_per_epoch:
                tic = time.monotonic()
                images = self.step(loader)
                step_seconds.append(time.monotonic() - tic)
                self.bar.update()
                self.bar.set_postfix(img_s=f"{images / max(step_seconds[-1], 1e-9):.3g}",
                                     refresh=False)
                if len(self.pending) >= LOSS_READ_STEPS:
                    self._read_losses()
                if max_steps is not None and state.global_step >= max_steps:
                    return False
                if state.step < self.steps_per_epoch and self.checkpoints.due(state):
                    self._save_checkpoint()
            return True
        finally:
            self.bar.close()

    def step(self, loader) -> int:
        """One optimiser step over the global batch; returns this process's image count.

        Nothing here waits for the device: inputs arrive with non-blocking copies, constants
        live on the device, and the loss stays there until :meth:`_read_losses`.
        """
        state, recipe, dist = self.state, self.recipe, self.dist
        # Dropout's stream is a function of (seed, rank, step): nothing to save or restore.
        torch.manual_seed(derived_seed(recipe.seed, DROPOUT_STREAM, dist.rank, state.global_step))
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, images, skipped = torch.zeros((), dtype=torch.float64, device=dist.device), 0, 0
        for k in range(self.accum):
            batch = next(loader)
            if not isinstance(batch, Batch):  # every image of this micro-batch was unreadable
                skipped += self._skip(batch)
                batch = None
            else:
                skipped += self._skip(batch.failed)
            # DDP reduces gradients on the last micro-batch only; the others accumulate locally.
            last = k == self.accum - 1
            with nullcontext() if dist.world_size == 1 or last else self.net.no_sync():
                loss = self._micro_step(batch)
            if batch is not None:
                loss_sum += loss.detach().double() * len(batch)
                images += len(batch)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        state.step += 1
        state.global_step += 1
        self.pending.append((loss_sum, images, skipped, state.global_step))
        return images

    def _micro_step(self, batch: Batch | None) -> Tensor:
        """Forward and backward of one micro-batch; returns its mean loss (on the device).

        An empty micro-batch still runs the net (on zero images) and its backward: every process
        must take part in DDP's gradient reduction, and in SyncBatchNorm's, at every step.
        """
        device = self.dist.device
        if batch is None:
            x = torch.zeros(0, 3, self.recipe.crop, self.recipe.crop, device=device)
        else:
            x = batch.images.to(device, non_blocking=True).float()
            x = pca_lighting(x, batch.alphas.to(device, non_blocking=True))
            x = self.model.preprocessing(x)
        x = x.contiguous(memory_format=self.memory_format)
        with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            outputs = self.forward(x)
        if batch is None:
            loss = outputs.float().sum() * 0.0  # zero gradients, through the whole graph
        else:
            loss = self.task.loss(outputs.float(), batch.targets.to(device, non_blocking=True))
        self.scaler.scale(loss / self.accum).backward()
        return loss

    def _skip(self, failed: list[tuple[int, str]]) -> int:
        """Record this process's unreadable images; returns how many."""
        if failed:
            paths = self.task.train_set.paths
            with open(self.run_dir / f"skipped-rank{self.dist.rank}.tsv", "a") as f:
                f.writelines(f"{paths[i]}\t{reason}\n" for i, reason in failed)
        return len(failed)

    def _read_losses(self) -> None:
        """Bring the pending steps' losses to the host (one sync, one collective), log them,
        and stop on a non-finite one."""
        if not self.pending:
            return
        state, dev, k = self.state, self.dist.device, len(self.pending)
        counts = torch.tensor([[n for _, n, _, _ in self.pending],
                               [n for _, _, n, _ in self.pending]], dtype=torch.float64)
        totals = torch.cat([torch.stack([loss for loss, *_ in self.pending]),
                            counts.flatten().to(dev)])
        sums = self.dist.all_reduce_sum(totals).tolist()  # every process's, added up
        losses, images_per_step, skipped = sums[:k], sums[k:2 * k], sums[2 * k:]
        state.skipped += int(sum(skipped))
        lr = self.optimizer.param_groups[0]["lr"]
        for (*_, global_step), loss_sum, images in zip(self.pending, losses, images_per_step):
            if not math.isfinite(loss_sum):
                raise TrainingError(
                    f"the training loss is {loss_sum / max(images, 1)} at step {global_step} "
                    f"(epoch {state.epoch + 1}, lr {lr:g}). " + self.checkpoints.what_is_kept())
            self.log.step(global_step, loss_sum / max(images, 1), lr)
            state.epoch_loss += loss_sum
            state.epoch_images += int(images)
        now = time.monotonic()
        self.log.images_per_s(self.pending[-1][-1],
                              sum(images_per_step) / max(now - self.read_at, 1e-9))
        self.read_at = now
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{losses[-1] / max(images_per_step[-1], 1):.3f}",
                                 refresh=False)
        self.pending.clear()

    def _end_epoch(self) -> None:
        """Validate, step the lr schedule, log, export the best weights, checkpoint."""
        state, task = self.state, self.task
        self._read_losses()
        if state.epoch_images == 0:
            raise TrainingError(f"no training image of epoch {state.epoch + 1} could be read; "
                                f"the reasons are in {self.run_dir}/skipped-rank*.tsv")
        seconds = time.monotonic() - self.epoch_started
        metrics = self._validate()
        self.scheduler.step(metrics[task.metrics[0]])
        row = {"epoch": state.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
               "train_loss": state.epoch_loss / max(state.epoch_images, 1), **metrics,
               "images_per_s": (state.epoch_images - self.images_before) / max(seconds, 1e-9),
               "skipped_images": state.skipped, "seconds": seconds}
        state.history.append(row)
        state.epoch, state.step, state.epoch_loss, state.epoch_images = state.epoch + 1, 0, 0.0, 0
        if self.dist.is_main:
            self.log.epoch(state.history)
            if metrics[task.metrics[0]] < state.best:
                self._export("best.safetensors", row)
        state.best = min(state.best, metrics[task.metrics[0]])
        self._save_checkpoint()

    def _validate(self) -> dict[str, float]:
        """The task's metrics over the validation images, each process scoring its share."""
        recipe, dist, task = self.recipe, self.dist, self.task
        images = task.val_set
        if recipe.val_limit and recipe.val_limit < len(images):
            keep = np.linspace(0, len(images) - 1, recipe.val_limit).round().astype(int)
            images = _subset(images, keep)
        shard = _subset(images, np.arange(dist.rank, len(images), dist.world_size))
        self.model.eval()
        try:
            sums = task.validate(self.model, shard, recipe, device=dist.device,
                                 workers=self.workers, amp=self.amp)
        finally:
            self.model.train()
        keys = ("images", *task.metrics)
        totals = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64)
        totals = dist.all_reduce_sum(totals.to(dist.device)).tolist()
        if totals[0] == 0:
            raise TrainingError(f"none of the {len(images)} validation images could be scored "
                                "(unreadable files?); check the val/ folder")
        return {k: v / totals[0] for k, v in zip(task.metrics, totals[1:])}

    # -- files ---------------------------------------------------------------------------------

    def _check_finite(self) -> None:
        """Refuse to write weights that are no longer finite (they would poison every later use)."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if not bool(finite):
            raise TrainingError(f"the weights are no longer finite after step "
                                f"{self.state.global_step}; nothing was written from them. "
                                + self.checkpoints.what_is_kept())

    def _export(self, name: str, metrics: dict) -> Path:
        self._check_finite()
        recipe = self.recipe
        return save_weights(self.model, self.run_dir / name,
                            meta={"train_scale": recipe.scale_label, "recipe": recipe.to_dict(),
                                  "lr": recipe.scaled_lr, "metrics": metrics,
                                  "trained_with": "vggfeat train", **self.task.weights_meta()})

    def _save_checkpoint(self) -> None:
        """Bring the pending losses in, check the weights, and write the checkpoint."""
        self._read_losses()
        self._check_finite()
        self.checkpoints.save(self.state, **self._stateful())


def _check_run(recipe: Recipe, task: Task, run_dir: Path, *, resume: bool) -> None:
    """Refuse a run that cannot start, before anything is built or written."""
    last = run_dir / CHECKPOINT
    if last.exists() and not resume:
        raise RecipeError(f"{run_dir} already holds a run ({last}); pass --resume to "
                          "continue it, or choose another --out")
    if not task.metrics:
        raise ConfigError(f"{type(task).__name__} names no validation metric: its ``metrics`` "
                          "must name at least one (the first chooses best.safetensors)")
    if len(task.train_set) < recipe.batch_size:
        raise RecipeError(f"batch_size {recipe.batch_size} is larger than the "
                          f"{len(task.train_set)} training images")


def _memory_format(recipe: Recipe, dist: Distributed) -> torch.memory_format:
    """channels_last on GPUs unless the recipe says otherwise."""
    channels_last = recipe.channels_last if recipe.channels_last is not None else \
        dist.device.type == "cuda"
    return torch.channels_last if channels_last else torch.contiguous_format


def _place(model: VGG, recipe: Recipe, dist: Distributed,
           memory_format: torch.memory_format) -> VGG:
    """The net on this process's device, in the training memory format; SyncBatchNorm when
    asked for with several processes."""
    if recipe.sync_bn and dist.world_size > 1:
        if dist.device.type != "cuda":
            raise RecipeError("sync_bn needs GPUs (NCCL); on CPU processes leave it off")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(dist.device, memory_format=memory_format)


def _micro_batching(recipe: Recipe, world: int) -> tuple[int, int]:
    """(images per forward pass, forward passes per step) of each process."""
    batch = recipe.batch_size
    if batch % world:
        raise RecipeError(f"batch_size {batch} must be divisible by the {world} processes")
    share = batch // world
    micro = min(recipe.micro_batch or share, share)
    if share % micro:
        raise RecipeError(f"micro_batch {micro} must divide the per-process batch {share}")
    return micro, share // micro


def _subset(images: ImageList, keep: np.ndarray) -> ImageList:
    return ImageList([images.paths[i] for i in keep],
                     None if images.labels is None else [images.labels[i] for i in keep],
                     images.class_names)
