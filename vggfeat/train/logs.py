"""Run logs: metrics per epoch as CSV, TensorBoard scalars, and a PNG plot of the curves."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..fileio import atomic_path, write_text_atomic
from ..optional import require

def columns(metrics: tuple[str, ...]) -> tuple[str, ...]:
    """metrics.csv's columns around a task's validation ``metrics``."""
    return ("epoch", "lr", "train_loss", *metrics, "images_per_s", "skipped_images", "seconds")


class RunLog:
    """Writes ``metrics.csv``, ``tensorboard/`` and ``curves.png`` into the run folder (rank 0).

    ``metrics``: the task's validation values (validation error %, lower is better).
    """

    def __init__(self, run_dir: Path, *, metrics: tuple[str, ...] = ("val_top1_error",
                                                                       "val_top5_error"),
                 enabled: bool = True) -> None:
        self.run_dir, self.enabled, self.metrics = run_dir, enabled, metrics
        self.columns = columns(metrics)
        self.csv_path = run_dir / "metrics.csv"
        self._tb = None
        if enabled:
            SummaryWriter = require("torch.utils.tensorboard", "train",
                                    "training's TensorBoard log").SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def step(self, global_step: int, loss: float, lr: float) -> None:
        if self._tb is not None:
            self._tb.add_scalar("train/loss_step", loss, global_step)
            self._tb.add_scalar("train/lr", lr, global_step)

    def images_per_s(self, global_step: int, rate: float) -> None:
        if self._tb is not None:
            self._tb.add_scalar("train/images_per_s", rate, global_step)

    def epoch(self, history: list[dict]) -> None:
        """Rewrite the CSV and the plot from the whole history (so a resumed run stays whole)."""
        if not self.enabled:
            return
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=self.columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
        write_text_atomic(self.csv_path, buffer.getvalue())
        row = history[-1]
        for key in self.columns[1:]:
            if row.get(key) is not None:
                self._tb.add_scalar(f"epoch/{key}", row[key], row["epoch"])
        self._tb.flush()
        plot_curves(history, self.run_dir / "curves.png", metrics=self.metrics)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def plot_curves(history: list[dict], path: Path, *,
                metrics: tuple[str, ...] = ("val_top1_error", "val_top5_error")) -> Path:
    """Training loss and the validation ``metrics`` (errors, %) against epochs."""
    # A bare Figure renders with Agg on its own: no pyplot, no global backend switch.
    Figure = require("matplotlib.figure", "train", "training's curves.png").Figure

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4))
    left, right = fig.subplots(1, 2)
    left.plot(epochs, [r["train_loss"] for r in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key in metrics:
        right.plot(epochs, [r[key] for r in history], marker="o",
                   label=key.removeprefix("val_").replace("_", " "))
    right.set(xlabel="epoch", ylabel="validation error (%)", title="validation")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path
