"""Run logs: metrics per epoch as CSV, TensorBoard scalars, and a PNG plot of the curves."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..fileio import write_text_atomic

COLUMNS = ("epoch", "lr", "train_loss", "val_top1_error", "val_top5_error", "images_per_s",
           "skipped_images", "seconds")


class RunLog:
    """Writes ``metrics.csv``, ``tensorboard/`` and ``curves.png`` into the run folder (rank 0)."""

    def __init__(self, run_dir: Path, *, enabled: bool = True) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self.csv_path = run_dir / "metrics.csv"
        self._tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def step(self, global_step: int, loss: float, lr: float, images_per_s: float) -> None:
        if self._tb is not None:
            self._tb.add_scalar("train/loss_step", loss, global_step)
            self._tb.add_scalar("train/lr", lr, global_step)
            self._tb.add_scalar("train/images_per_s", images_per_s, global_step)

    def epoch(self, history: list[dict]) -> None:
        """Rewrite the CSV and the plot from the whole history (so a resumed run stays whole)."""
        if not self.enabled:
            return
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
        write_text_atomic(self.csv_path, buffer.getvalue())
        row = history[-1]
        for key in COLUMNS[1:]:
            if row.get(key) is not None:
                self._tb.add_scalar(f"epoch/{key}", row[key], row["epoch"])
        self._tb.flush()
        plot_curves(history, self.run_dir / "curves.png")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def plot_curves(history: list[dict], path: Path) -> Path:
    """Training loss and validation top-1/top-5 error against epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [r["train_loss"] for r in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss (cross-entropy)", title="loss")
    right.plot(epochs, [r["val_top1_error"] for r in history], marker="o", label="top-1")
    right.plot(epochs, [r["val_top5_error"] for r in history], marker="o", label="top-5")
    right.set(xlabel="epoch", ylabel="validation error (%)", title="validation error")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(".curves.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
