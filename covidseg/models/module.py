"""The LightningModule: network + combined loss + per-split Dice/IoU."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from covidseg.metrics import SegmentationScores

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
        flip_tta: in eval mode, average the logits of the image and of its horizontal mirror.
        restrict_to_lungs: in eval mode, with ``lung`` and ``infection`` targets, cap the infection
            logit at the lung logit, so infection is only predicted inside predicted lungs.
        presence_weight: > 0 adds a presence head (global average pool of the network's deepest
            encoder features, then a linear layer) that predicts whether the primary target is
            present at all, trained with this weight on BCE; the net must have ``encode``/``decode``.
        presence_threshold: in eval mode, predict an empty primary mask where the presence
            probability is below this (null: never); healthy lungs then get no scattered pixels.
        segment_present_only: compute the segmentation loss only on images whose primary mask is
            not empty, leaving "nothing here" to the presence head (required). Per-image soft Dice
            on an empty truth punishes every predicted pixel, which makes the decoder cautious on
            infected lungs too; without it healthy lungs depend on the presence gate alone.

    ``train_input_size`` (an attribute, not a hyper-parameter) makes training steps run at another
    side than ``input_size``: progressive resizing sets it, evaluation never uses it.
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
        flip_tta: bool = False,
        restrict_to_lungs: bool = False,
        presence_weight: float = 0.0,
        presence_threshold: float | None = None,
        segment_present_only: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler"], logger=False)
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        if compile:
            self.net.compile()  # in place: parameter names, hence checkpoints, stay the same
        self.loss = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.targets = list(targets)
        out_channels = getattr(net, "out_channels", len(self.targets))
        if out_channels != len(self.targets):
            raise ValueError(f"the network outputs {out_channels} channel(s) but targets are {self.targets}")
        self.primary_target = "infection" if "infection" in self.targets else self.targets[0]
        self.flip_tta = flip_tta
        self.restrict_to_lungs = restrict_to_lungs and {"lung", "infection"} <= set(self.targets)
        self.presence_head = None
        if presence_weight > 0:
            if not all(hasattr(net, name) for name in ("encode", "decode", "bottleneck_channels")):
                raise ValueError(f"model.presence_weight needs a net with encode/decode; {type(net).__name__} has none")
            self.presence_head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(net.bottleneck_channels, 1), nn.Flatten(0)
            )
        elif presence_threshold is not None or segment_present_only:
            option = "presence_threshold" if presence_threshold is not None else "segment_present_only"
            raise ValueError(f"model.{option} needs a presence head: set model.presence_weight > 0")
        self.train_input_size: int | None = None
        # keyed "train_scores" etc.: a ModuleDict key may not shadow nn.Module.train
        self.scores = nn.ModuleDict(
            {
                f"{stage}_scores": nn.ModuleDict({target: SegmentationScores(threshold) for target in self.targets})
                for stage in STAGES
            }
        )
        self.example_input_array = torch.zeros(1, getattr(net, "in_channels", 1), 64, 64)
        self.test_names: list[str] = []
        self.test_per_image: dict[str, list[float]] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at the input's resolution, whatever ``input_size`` the network runs at; in eval
        mode with the eval-time options (flip TTA, lungs, presence gate) applied."""
        return self._predict(images)[0]

    def _predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and presence logits (``None`` without a presence head)."""
        logits, presence = self._logits(images)
        if self.training:
            return logits, presence
        if self.flip_tta:
            flipped, flipped_presence = self._logits(images.flip(-1))
            logits = (logits + flipped.flip(-1)) / 2
            presence = None if presence is None else (presence + flipped_presence) / 2
        if self.restrict_to_lungs:
            # infection probability <= lung probability: none where the lung is not predicted
            lung, infection = self.targets.index("lung"), self.targets.index("infection")
            logits[:, infection] = torch.minimum(logits[:, infection], logits[:, lung])
        threshold = self.hparams.presence_threshold
        if presence is not None and threshold is not None:
            primary = self.targets.index(self.primary_target)
            absent = (presence.sigmoid() < threshold)[:, None, None]
            logits[:, primary] = torch.where(absent, torch.full_like(logits[:, primary], -20.0), logits[:, primary])
        return logits, presence

    def _logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        size = images.shape[-2:]
        input_size = (self.training and self.train_input_size) or self.hparams.input_size
        if input_size and tuple(size) != (input_size, input_size):
            images = F.interpolate(images, size=(input_size, input_size), mode="area")
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.presence_head is None:
            logits, presence = self.net(images), None
        else:
            features = self.net.encode(images)
            presence = self.presence_head(features[-1])
            logits = self.net.forward_head(self.net.decode(features))
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits, presence

    def _shared_step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        logits, presence = self._predict(batch["image"])
        masks = batch["mask"]
        present = masks[:, self.targets.index(self.primary_target)].flatten(1).amax(1) > 0.5
        if self.hparams.segment_present_only:
            # no infected image in the batch: a zero that keeps every parameter in the graph (DDP)
            loss = self.loss(logits[present], masks[present]) if present.any() else logits.sum() * 0
        else:
            loss = self.loss(logits, masks)
        if presence is not None:
            presence_loss = F.binary_cross_entropy_with_logits(presence, present.to(presence.dtype))
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
        detached = logits.detach()
        for channel, target in enumerate(self.targets):
            self.scores[f"{stage}_scores"][target].update(detached[:, channel], masks[:, channel])
        if stage == "test" and presence is not None:
            self.test_per_image.setdefault("presence_probability", []).extend(presence.sigmoid().tolist())
        return loss, detached

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._shared_step(batch, "train")[0]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Returns the logits, for callbacks that chart them (precision-recall curve)."""
        return {"logits": self._shared_step(batch, "val")[1]}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        self.test_names.extend(batch["name"])
        return {"logits": self._shared_step(batch, "test")[1]}

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return {"name": batch["name"], "probability": self(batch["image"]).sigmoid()}

    def _log_scores(self, stage: str) -> None:
        for target, metric in self.scores[f"{stage}_scores"].items():
            scores = metric.compute()
            if stage == "test":
                for key, values in metric.per_image().items():
                    self.test_per_image[f"{key}_{target}"] = values.tolist()
            names = {f"{stage}/{key}": value for key, value in scores.items()} if target == self.primary_target else {}
            if len(self.targets) > 1:
                names |= {f"{stage}/{key}_{target}": value for key, value in scores.items()}
            self.log_dict(names, prog_bar=stage == "val")
            metric.reset()

    def on_train_epoch_end(self) -> None:
        self._log_scores("train")

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_epoch_start(self) -> None:
        self.test_names = []
        self.test_per_image = {}

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        extra = {}
        if "total_steps" in inspect.signature(self.scheduler_factory).parameters:
            extra["total_steps"] = int(self.trainer.estimated_stepping_batches)  # e.g. OneCycleLR
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": self.scheduler_factory(optimizer=optimizer, **extra),
                "interval": self.hparams.scheduler_interval,
                "monitor": "val/dice",
            },
        }
