"""Pictures of validation in TensorBoard: example predictions, the precision-recall curve and the
histogram of per-image Dice, each validation epoch."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchmetrics.classification import BinaryPrecisionRecallCurve

from covidseg.core.visualize import comparison_row
from covidseg.inference.model_spec import InferenceSettings
from covidseg.inference.predictor import Predictor


def tensorboard_writers(trainer: L.Trainer) -> list:
    """The SummaryWriters of the run's TensorBoard loggers (rank zero only, none in sanity checks)."""
    if trainer.sanity_checking or not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


class ValidationImageLogger(L.Callback):
    """Each validation epoch, logs a grid of the same validation images to TensorBoard:
    one row per image, ``X-ray | truth | prediction``.

    Args:
        num_images: how many images, spread evenly over the validation set.
    """

    def __init__(self, num_images: int = 6) -> None:
        self.num_images = num_images

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writers = tensorboard_writers(trainer)
        if not writers:
            return
        dataset = trainer.datamodule.dataset("Val")
        indices = np.linspace(0, len(dataset) - 1, min(self.num_images, len(dataset))).round().astype(int)
        samples = [dataset[int(index)] for index in indices]
        images = torch.stack([sample["image"] for sample in samples]).to(pl_module.device)
        settings = InferenceSettings(threshold=pl_module.hparams.threshold)
        predictor = Predictor([pl_module.network], pl_module.targets, settings)
        mask = predictor.predict(images).mask.cpu()
        channel = pl_module.targets.index(pl_module.primary_target)
        rows = [
            comparison_row(
                (sample["image"][0].numpy() * 255).astype(np.uint8),
                sample["mask"][channel].numpy(),
                mask[row, channel].numpy(),
            )
            for row, sample in enumerate(samples)
        ]
        for writer in writers:
            writer.add_image("val/examples", np.concatenate(rows, axis=0), trainer.global_step, dataformats="HWC")


class ValidationCharts(L.Callback):
    """Each validation epoch, logs the pixel precision-recall curve of the primary target and the
    histogram of per-image Dice to TensorBoard.

    Args:
        thresholds: number of evenly spaced probability thresholds of the curve (constant memory).
    """

    def __init__(self, thresholds: int = 51) -> None:
        self.curve = BinaryPrecisionRecallCurve(thresholds=thresholds)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, **_: Any
    ) -> None:
        if tensorboard_writers(trainer) and outputs is not None:
            channel = pl_module.targets.index(pl_module.primary_target)
            self.curve.to(pl_module.device).update(
                outputs["logits"][:, channel].sigmoid(), batch["mask"][:, channel].long()
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        writers = tensorboard_writers(trainer)
        if not writers:
            return
        # counts per threshold, as TensorBoard's raw PR curve wants them
        confmat = self.curve.confmat.cpu().double()  # (thresholds, 2, 2): [[tn, fp], [fn, tp]]
        tp, fp, tn, fn = confmat[:, 1, 1], confmat[:, 0, 1], confmat[:, 0, 0], confmat[:, 1, 0]
        precision = tp / (tp + fp).clamp(min=1)
        recall = tp / (tp + fn).clamp(min=1)
        dice = pl_module.scores["val_scores"][pl_module.primary_target].per_image()["dice"]
        for writer in writers:
            writer.add_pr_curve_raw(
                "val/pr_curve", tp, fp, tn, fn, precision, recall, trainer.global_step, num_thresholds=len(tp)
            )
            writer.add_histogram("val/per_image_dice", dice, trainer.global_step)
        self.curve.reset()
