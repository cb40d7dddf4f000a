"""A training run's checkpoint, ``checkpoints/last.pt``: what is in it, when it is written.

It holds the net, optimiser, lr schedule and loss scaler, the recipe, and the loop's position
and history (:class:`TrainState`), so that ``--resume`` ends with the same weights as an
uninterrupted run.  Rank 0 writes it atomically; it is read with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from ..distributed import Distributed
from ..errors import TrainingError
from ..fileio import atomic_path
from .recipe import Recipe, RecipeError

CHECKPOINT = Path("checkpoints") / "last.pt"
# Steps before the first time-based checkpoint decision (later ones follow the measured pace).
FIRST_CHECK_STEPS = 10


@dataclass
class TrainState:
    """Where the loop is, and what it has learnt so far: all of it goes into the checkpoint."""

    epoch: int = 0
    step: int = 0  # next step within ``epoch``
    global_step: int = 0
    best: float = math.inf  # lowest value of the task's first metric so far
    skipped: int = 0
    history: list[dict] = field(default_factory=list)
    epoch_loss: float = 0.0  # loss sum and images of the epoch so far: its mean survives resume
    epoch_images: int = 0


def state_entries(state: TrainState) -> dict:
    """The checkpoint's entries for ``state``: one per field (the history as a JSON string)."""
    entries = asdict(state)
    entries["history"] = json.dumps(entries["history"])
    return entries


def state_from_entries(checkpoint: dict, path: Path) -> TrainState:
    """The :class:`TrainState` that :func:`state_entries` wrote into ``checkpoint``."""
    names = [f.name for f in fields(TrainState)]
    missing = [name for name in names if name not in checkpoint]
    if missing:
        raise TrainingError(f"{path} has no {', '.join(missing)}: it is not a checkpoint of this "
                            "vggfeat version; start a new run in another --out")
    values = {name: checkpoint[name] for name in names}
    values["history"] = json.loads(values["history"])
    return TrainState(**values)


class Checkpointer:
    """Writes and reads a run's checkpoint, and decides when the next one is due.

    A checkpoint is due every ``recipe.checkpoint_steps`` steps, or about every
    ``recipe.checkpoint_minutes``: rank 0 turns the minutes into a step count from its measured
    pace, and every rank hears it at the same step, so no step waits for a collective.
    """

    def __init__(self, run_dir: Path, recipe: Recipe, dist: Distributed) -> None:
        self.path = run_dir / CHECKPOINT
        self.recipe, self.dist = recipe, dist
        self.saved_at = time.monotonic()
        self.saved_at_step = 0
        self.next_check = FIRST_CHECK_STEPS

    def exists(self) -> bool:
        return self.path.exists()

    def what_is_kept(self) -> str:
        """What a run that stops on an error leaves behind, and how to go on."""
        if self.exists():
            return (f"The last good checkpoint {self.path} is intact: lower --lr (or check the "
                    "data) and run again with --resume")
        return ("No checkpoint had been written yet: lower --lr (or check the data) and start "
                "again")

    def due(self, state: TrainState) -> bool:
        recipe, dist = self.recipe, self.dist
        if recipe.checkpoint_steps:
            return state.step % recipe.checkpoint_steps == 0
        if state.global_step < self.next_check:
            return False
        period = 60 * recipe.checkpoint_minutes
        elapsed = time.monotonic() - self.saved_at
        pace = elapsed / max(state.global_step - self.saved_at_step, 1)  # s per step
        due = dist.broadcast_flag(elapsed >= period)
        wait = period if due else period - elapsed
        self.next_check = state.global_step + dist.broadcast_int(max(1, math.ceil(wait / pace)))
        return due

    def save(self, state: TrainState, *, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler, scaler: torch.amp.GradScaler) -> None:
        """Rank 0 writes the whole training state atomically; every rank waits for it."""
        if self.dist.is_main:
            checkpoint = {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "recipe": self.recipe.to_dict(), "world_size": self.dist.world_size,
                **state_entries(state)}
            with atomic_path(self.path) as tmp:
                torch.save(checkpoint, tmp)
        self.dist.barrier()
        self.saved_at, self.saved_at_step = time.monotonic(), state.global_step

    def load(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
             scaler: torch.amp.GradScaler) -> TrainState:
        """Restore the objects from the checkpoint (the recipe must not have changed what a
        resume keeps fixed); returns the loop's state."""
        checkpoint = torch.load(self.path, map_location="cpu", weights_only=True)
        saved, current = checkpoint["recipe"], self.recipe.to_dict()
        changed = [f"{k}: {saved.get(k)!r} → {current[k]!r}" for k in self.recipe.resume_fixed
                   if saved.get(k) != current[k]]
        if changed:
            raise RecipeError(f"{self.path} was trained with other settings "
                              f"({'; '.join(changed)}); resume with the same recipe, or start a "
                              "new run in another --out")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        if checkpoint["scaler"] and scaler.is_enabled():
            # A run started without fp16 has no scaler state: the scaler then starts afresh.
            scaler.load_state_dict(checkpoint["scaler"])
        state = state_from_entries(checkpoint, self.path)
        self.saved_at_step = state.global_step
        self.next_check = state.global_step + FIRST_CHECK_STEPS
        return state
