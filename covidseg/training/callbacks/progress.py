"""Progress: Rich's live bar in a terminal, one line per epoch where output is a log file or CI."""

from __future__ import annotations

import sys
import time

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar


class EpochLines(ProgressBar):
    """Progress as one line per epoch (epoch, seconds, the epoch's metrics), for output that is not
    a terminal (a log file, CI), where a live progress bar breaks into fragments."""

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True
        self.started = time.perf_counter()

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()  # an epoch resumed midway starts no epoch: time its rest

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        shown = " ".join(
            f"{name} {float(metrics[name]):.4f}"
            for name in sorted(metrics)
            if name.endswith(("loss_epoch", "/dice")) or name in ("val/loss",)
        )
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        print(
            f"epoch {trainer.current_epoch + 1}{epochs}  {time.perf_counter() - self.started:.1f} s  {shown}",
            flush=True,
        )


def progress_display() -> ProgressBar:
    """Rich's live progress bar in a terminal; one line per epoch otherwise (logs, CI)."""
    return RichProgressBar() if sys.stdout.isatty() else EpochLines()
