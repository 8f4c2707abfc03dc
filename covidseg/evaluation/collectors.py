"""What a test loop collects per image, from the test steps' masks: Dice, IoU, areas and presence
(:class:`PerImageResults`), and severity from the predicted and the true masks (:class:`SeverityOnTest`).

Both work in ``trainer.test`` of a :class:`~covidseg.models.SegmentationModule` (train's test of
its best checkpoint) or of a :class:`~covidseg.inference.predictor.PredictorModule` (eval), whose
test steps return ``probability``, ``mask`` and ``presence``.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L

from covidseg.core.errors import ConfigError
from covidseg.core.metrics import CLEAN_AREA_SHARE, SegmentationScores
from covidseg.inference.severity import agreement, severity


class PerImageResults(L.Callback):
    """Collects each test image's name, Dice, IoU and areas per target (and presence probability)
    from the test steps' masks; :meth:`metrics` and :meth:`columns` summarise them.

    Args:
        targets: the mask channels' names, in order.
        image_size: side of the evaluated masks (for the "almost empty" area limit).
        xray_threshold: the model's x-ray check threshold: the share of test images it would refuse
            is reported (``test/xray_refused``); their scores are a column either way.
    """

    def __init__(self, targets: Sequence[str], image_size: int, xray_threshold: float | None = None) -> None:
        self.targets = list(targets)
        self.primary_target = "infection" if "infection" in self.targets else self.targets[0]
        self.image_size = image_size
        self.scores = {target: SegmentationScores(from_logits=False) for target in self.targets}
        self.names: list[str] = []
        self.presence: list[float] = []
        self.xray_threshold = xray_threshold
        self.xray_scores: list[float] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.names.extend(batch["name"])
        masks = outputs["mask"].float().cpu()
        for channel, target in enumerate(self.targets):
            self.scores[target].update(masks[:, channel], batch["mask"][:, channel].cpu())
        if outputs.get("presence") is not None:
            self.presence.extend(outputs["presence"].float().cpu().tolist())
        if outputs.get("xray_score") is not None:
            self.xray_scores.extend(outputs["xray_score"].float().cpu().tolist())

    def metrics(self) -> dict[str, float]:
        """``test/dice`` etc. of the primary target, per target too when there are several, and on
        images with empty truth the share predicted almost empty (``test/empty_truth_clean``)."""
        metrics: dict[str, float] = {}
        for target, scores in self.scores.items():
            values = {key: float(value) for key, value in scores.compute().items()}
            if target == self.primary_target:
                metrics |= {f"test/{key}": value for key, value in values.items()}
            if len(self.targets) > 1:
                metrics |= {f"test/{key}_{target}": value for key, value in values.items()}
        rows = self.scores[self.primary_target].per_image()
        empty = rows["truth_area"] == 0
        if empty.any():
            clean = rows["predicted_area"][empty] < CLEAN_AREA_SHARE * self.image_size**2
            metrics |= {
                "test/empty_truth_images": float(empty.sum()),
                "test/empty_truth_clean": float(clean.double().mean()),
            }
        if self.xray_scores and self.xray_threshold is not None:  # NaN scores are refused, as predict does
            refused = [not score <= self.xray_threshold for score in self.xray_scores]
            metrics |= {"test/xray_refused": sum(refused) / len(refused), "test/xray_refused_images": sum(refused)}
        return metrics

    def columns(self) -> dict[str, list[float]]:
        """Per-image columns for the CSV: ``dice_<target>``, ``iou_<target>``, areas, presence."""
        columns = {
            f"{key}_{target}": values.tolist()
            for target, scores in self.scores.items()
            for key, values in scores.per_image().items()
        }
        columns |= {"presence_probability": self.presence} if self.presence else {}
        return columns | ({"xray_score": self.xray_scores} if self.xray_scores else {})


class SeverityOnTest(L.Callback):
    """For models with ``lung`` and ``infection`` targets, grades severity of each test image from
    the predicted masks and from the truth; rows in ``rows``, agreement logged as ``severity/*``."""

    def __init__(self, zone_threshold: float = 0.05) -> None:
        if (
            isinstance(zone_threshold, bool)
            or not isinstance(zone_threshold, int | float)
            or not 0 < zone_threshold < 1
        ):
            raise ConfigError(
                f"callbacks.severity.zone_threshold={zone_threshold!r}: expected the share of a lung zone that "
                "counts it as infected, between 0 and 1"
            )
        self.zone_threshold = zone_threshold
        self.rows: list[dict] = []
        self.truth_rows: list[dict] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.rows, self.truth_rows = [], []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        targets = pl_module.targets
        if not {"lung", "infection"} <= set(targets) or outputs is None:
            return
        lung, infection = targets.index("lung"), targets.index("infection")
        predicted = outputs["mask"].cpu().numpy()
        truth = batch["mask"].cpu().numpy() > 0.5
        for masks, rows in ((predicted, self.rows), (truth, self.truth_rows)):
            rows.extend(severity(m[lung], m[infection], self.zone_threshold) for m in masks)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.rows:
            pl_module.log_dict(agreement(self.rows, self.truth_rows))

    def columns(self) -> dict[str, list[float]]:
        """``predicted_*`` and ``true_*`` per-image columns (empty for models without lungs)."""
        columns: dict[str, list[float]] = {}
        for prefix, rows in (("predicted", self.rows), ("true", self.truth_rows)):
            if rows:
                columns |= {f"{prefix}_{key}": [row[key] for row in rows] for key in rows[0]}
        return columns
