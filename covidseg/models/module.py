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
        """Logits at the input's resolution, whatever ``input_size`` the network runs at."""
        logits = self._logits(images)
        if self.training:
            return logits
        if self.flip_tta:
            logits = (logits + self._logits(images.flip(-1)).flip(-1)) / 2
        if self.restrict_to_lungs:
            # infection probability <= lung probability: none where the lung is not predicted
            lung, infection = self.targets.index("lung"), self.targets.index("infection")
            logits[:, infection] = torch.minimum(logits[:, infection], logits[:, lung])
        return logits

    def _logits(self, images: torch.Tensor) -> torch.Tensor:
        size = images.shape[-2:]
        input_size = self.hparams.input_size
        if input_size and tuple(size) != (input_size, input_size):
            images = F.interpolate(images, size=(input_size, input_size), mode="area")
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits = self.net(images)
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits

    def _shared_step(self, batch: dict[str, Any], stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["image"])
        masks = batch["mask"]
        loss = self.loss(logits, masks)
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
