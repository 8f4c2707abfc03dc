"""The LightningModule: network + combined loss + optimiser + per-split Dice/IoU.

Inference settings (threshold aside, flip TTA, lung restriction, presence gate) belong to
:class:`covidseg.inference.predictor.Predictor`; validation and test here score the network's raw output.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from covidseg.core.errors import ConfigError
from covidseg.core.metrics import SegmentationScores
from covidseg.models.network import SegmentationNetwork

STAGES = ("train", "val", "test")


class SegmentationModule(L.LightningModule):
    """Trains ``net`` to output one logit channel per target mask.

    Logged names: ``{stage}/loss`` and, for the primary target (``infection`` when present),
    ``{stage}/dice``, ``{stage}/iou``, ``{stage}/dice_pooled``, ``{stage}/iou_pooled``; with several
    targets each one's scores also carry its name (``val/dice_lung``).

    Args:
        net: the segmentation network (built from config, not saved in hyper-parameters).
        loss: ``loss(logits, masks)``.
        optimizer: a partial taking the parameters (Hydra ``_partial_: true``).
        scheduler: an optional partial taking the optimizer; stepped per ``scheduler_interval``.
        targets: names of the mask channels, as in the datamodule.
        threshold: probability above which a pixel counts as positive.
        channels_last: run the network in NHWC memory format (faster oneDNN convolutions on CPU).
        compile: compile the network with ``torch.compile`` (faster steps after a slow first one).
        input_size: run the network at this side (area-downsampled input, bilinear-upsampled
            logits), so that loss and metrics stay at the data's full resolution.
        presence_weight: > 0 gives the network a presence head (see
            :class:`~covidseg.models.network.SegmentationNetwork`) that predicts whether the primary
            target is present at all, trained with this weight on BCE.
        presence_label_smoothing: train the presence head towards ``s/2`` and ``1 - s/2`` instead
            of 0 and 1, so that a few unusual images cannot drive its logits (and the encoder
            features it shares) to extremes; 0 keeps hard targets.
        segment_present_only: compute the segmentation loss only on images whose primary mask is
            not empty, leaving "nothing here" to the presence head (required). Per-image soft Dice
            on an empty truth punishes every predicted pixel, which makes the decoder cautious on
            infected lungs too; without it healthy lungs depend on the presence gate alone. Other
            targets (the lungs) are still scored on every image.
        distill_weight: > 0 adds, in training steps, this weight times BCE between the primary
            target's logits and a teacher's probabilities (the batch's ``"teacher"``, from
            ``data.teacher_targets``), on the images the segmentation loss sees.

    ``network.train_input_size`` makes training steps run at another side than ``input_size``:
    progressive resizing sets it, evaluation never uses it.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        targets: Sequence[str] = ("infection",),
        threshold: float = 0.5,
        channels_last: bool = False,
        compile: bool = False,
        input_size: int | None = None,
        presence_weight: float = 0.0,
        presence_label_smoothing: float = 0.0,
        segment_present_only: bool = False,
        distill_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler"], logger=False)
        if segment_present_only and presence_weight <= 0:
            raise ValueError("model.segment_present_only needs a presence head: set model.presence_weight > 0")
        if not 0 <= presence_label_smoothing < 1:
            raise ValueError(f"model.presence_label_smoothing is {presence_label_smoothing}; expected 0 <= s < 1")
        self.network = SegmentationNetwork(net, presence_weight > 0, input_size, channels_last)
        if compile:
            self.network.net.compile()  # in place: parameter names, hence checkpoints, stay the same
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.targets = list(targets)
        out_channels = self.network.out_channels or len(self.targets)
        if out_channels != len(self.targets):
            raise ValueError(f"the network outputs {out_channels} channel(s) but targets are {self.targets}")
        self.primary_target = "infection" if "infection" in self.targets else self.targets[0]
        # keyed "train_scores" etc.: a ModuleDict key may not shadow nn.Module.train
        self.scores = nn.ModuleDict(
            {
                f"{stage}_scores": nn.ModuleDict({target: SegmentationScores(threshold) for target in self.targets})
                for stage in STAGES
            }
        )
        self.example_input_array = torch.zeros(1, self.network.in_channels, 64, 64)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at the input's resolution, whatever side the network runs at."""
        return self.network(images)[0]

    def _shared_step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        logits, presence = self.network(batch["image"])
        masks = batch["mask"]
        present = masks[:, self.targets.index(self.primary_target)].flatten(1).amax(1) > 0.5
        loss = self._segmentation_loss(logits, masks, present, batch, stage)
        if presence is not None:
            presence = presence.float()
            smoothing = self.hparams.presence_label_smoothing
            target = present.float() * (1 - smoothing) + smoothing / 2
            presence_loss = F.binary_cross_entropy_with_logits(presence, target)
            self.log(f"{stage}/presence_loss", presence_loss, on_epoch=True, batch_size=len(masks),
                     sync_dist=stage != "train")  # fmt: skip
            loss = loss + self.hparams.presence_weight * presence_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{stage} loss is {loss.item()} at global step {self.global_step} "
                f"(batch starting with {batch['name'][0]!r}); lower model.optimizer.lr or check the data"
            )
        training = stage == "train"  # validation and test losses are averaged across DDP ranks
        self.log(f"{stage}/loss", loss, on_step=training, on_epoch=True, batch_size=len(masks), prog_bar=True,
                 sync_dist=not training)  # fmt: skip
        detached = logits.detach().float()
        for channel, target in enumerate(self.targets):
            self.scores[f"{stage}_scores"][target].update(detached[:, channel], masks[:, channel])
        return loss, detached

    def _segmentation_loss(
        self, logits: torch.Tensor, masks: torch.Tensor, present: torch.Tensor, batch: dict[str, Any], stage: str
    ) -> torch.Tensor:
        """The segmentation (and distillation) loss. Under ``segment_present_only`` the primary target's
        channel is scored on the images where it is present and every other channel (the lungs, which
        every image has) on all images, each part weighted by its number of channels, so the scale
        stays that of one loss over all channels."""
        primary = self.targets.index(self.primary_target)
        distill = self.hparams.distill_weight if stage == "train" else 0.0
        if not self.hparams.segment_present_only:
            loss = self.loss(logits, masks)
            if distill:
                loss = loss + distill * self._distill_loss(logits[:, primary], batch.get("teacher"))
            return loss
        loss = logits.sum() * 0  # keeps every parameter in the graph (DDP) when no image has the target
        taught: torch.Tensor | float = 0.0  # the distillation term, outside the channels' weighting
        if present.any():
            infected = logits[present][:, [primary]]
            loss = loss + self.loss(infected, masks[present][:, [primary]])
            if distill:
                teacher = batch["teacher"][present] if "teacher" in batch else None
                taught = distill * self._distill_loss(infected[:, 0], teacher)
        others = [channel for channel in range(len(self.targets)) if channel != primary]
        if others:
            loss = (loss + len(others) * self.loss(logits[:, others], masks[:, others])) / len(self.targets)
        return loss + taught

    def _distill_loss(self, primary: torch.Tensor, teacher: torch.Tensor | None) -> torch.Tensor:
        """BCE of the primary target's logits against the teacher's probabilities."""
        if teacher is None:
            raise ValueError("model.distill_weight > 0 needs data.teacher_targets (python -m covidseg.distill)")
        return F.binary_cross_entropy_with_logits(primary.float(), teacher[:, 0])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")[0]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Returns the logits, for callbacks that chart them (precision-recall curve)."""
        return {"logits": self._shared_step(batch, "val")[1]}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Returns probabilities and masks, as :class:`~covidseg.inference.predictor.PredictorModule` does."""
        probability = self._shared_step(batch, "test")[1].sigmoid()
        return {"probability": probability, "mask": probability > self.hparams.threshold, "presence": None}

    def _log_scores(self, stage: str) -> None:
        for target, metric in self.scores[f"{stage}_scores"].items():
            if not metric.update_count:  # an epoch resumed after its last training batch trained nothing here
                continue
            scores = metric.compute()
            names = {f"{stage}/{key}": value for key, value in scores.items()} if target == self.primary_target else {}
            if len(self.targets) > 1:
                names |= {f"{stage}/{key}_{target}": value for key, value in scores.items()}
            self.log_dict(names, prog_bar=stage == "val")
            metric.reset()

    def on_train_epoch_end(self) -> None:
        self._log_scores("train")

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def configure_optimizers(self) -> Any:
        try:  # torch checks the values it is given (a pct_start of 2, a negative momentum) only here
            optimizer = self.optimizer_factory(params=self.parameters())
        except (ValueError, TypeError) as error:
            raise ConfigError(f"model.optimizer: {error}") from None
        if self.scheduler_factory is None:
            return optimizer
        extra = {}
        if "total_steps" in inspect.signature(self.scheduler_factory).parameters:
            extra["total_steps"] = int(self.trainer.estimated_stepping_batches)  # e.g. OneCycleLR
        try:
            scheduler = self.scheduler_factory(optimizer=optimizer, **extra)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"model.scheduler: {error}") from None
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.hparams.scheduler_interval,
                "monitor": "val/dice",
            },
        }
