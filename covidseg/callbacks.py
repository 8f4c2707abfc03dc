"""Callbacks of covidseg's own; the rest come from Lightning."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from covidseg.visualize import comparison_row


class ValidationImageLogger(L.Callback):
    """Each validation epoch, logs a grid of the same validation images to TensorBoard:
    one row per image, ``X-ray | truth | prediction``.

    Args:
        num_images: how many images, spread evenly over the validation set.
    """

    def __init__(self, num_images: int = 6) -> None:
        self.num_images = num_images

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if trainer.sanity_checking or not loggers or not trainer.is_global_zero:
            return
        dataset = trainer.datamodule.dataset("Val")
        indices = np.linspace(0, len(dataset) - 1, min(self.num_images, len(dataset))).round().astype(int)
        samples = [dataset[int(index)] for index in indices]
        images = torch.stack([sample["image"] for sample in samples]).to(pl_module.device)
        with torch.no_grad():
            probability = pl_module(images).sigmoid().cpu()
        channel = pl_module.targets.index(pl_module.primary_target)
        threshold = pl_module.hparams.threshold
        rows = [
            comparison_row(
                (sample["image"][0].numpy() * 255).astype(np.uint8),
                sample["mask"][channel].numpy(),
                (probability[row, channel] > threshold).numpy(),
            )
            for row, sample in enumerate(samples)
        ]
        grid = np.concatenate(rows, axis=0)
        for logger in loggers:
            logger.experiment.add_image("val/examples", grid, trainer.global_step, dataformats="HWC")
