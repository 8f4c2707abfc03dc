"""Per-image and pooled Dice/IoU as one torchmetrics ``Metric``.

torchmetrics' ``DiceScore(aggregation_level="samplewise")`` scores an image whose truth and
prediction are both empty as 0; on this dataset (healthy lungs have empty masks) that is a correct
answer and must score 1. Keeping each image's areas also gives the pooled scores and the per-image
rows of the evaluation CSV from a single pass, synchronised across DDP ranks by torchmetrics.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

# A mask whose predicted area is below this share of the image counts as clean (healthy lungs).
CLEAN_AREA_SHARE = 0.01


class SegmentationScores(Metric):
    """Dice and IoU of binary masks: per-image mean (``dice``, ``iou``) and pooled over all pixels
    (``dice_pooled``, ``iou_pooled``). Inputs are probabilities or logits with ``from_logits``."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, threshold: float = 0.5, from_logits: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.from_logits = from_logits
        for state in ("intersection", "predicted", "truth"):
            self.add_state(state, default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds`` and ``target`` of shape ``(N, ...)``; each of the N images is scored alone."""
        preds = preds.float()  # thresholds compare in fp32, also under bf16 autocast
        probs = preds.sigmoid() if self.from_logits else preds
        predicted = (probs > self.threshold).flatten(1)
        truth = (target > 0.5).flatten(1)
        self.intersection.append((predicted & truth).sum(1).double())
        self.predicted.append(predicted.sum(1).double())
        self.truth.append(truth.sum(1).double())

    def per_image(self) -> dict[str, torch.Tensor]:
        """Each image's Dice, IoU and areas (in pixels), in update order."""
        intersection = dim_zero_cat(self.intersection)
        predicted = dim_zero_cat(self.predicted)
        truth = dim_zero_cat(self.truth)
        total = predicted + truth
        union = total - intersection
        empty = total == 0
        return {
            "dice": torch.where(empty, 1.0, 2 * intersection / total.clamp(min=1)),
            "iou": torch.where(empty, 1.0, intersection / union.clamp(min=1)),
            "truth_area": truth,
            "predicted_area": predicted,
            "intersection": intersection,
        }

    def compute(self) -> dict[str, torch.Tensor]:
        rows = self.per_image()
        intersection = rows["intersection"].sum()
        total = rows["truth_area"].sum() + rows["predicted_area"].sum()
        empty = total == 0
        return {
            "dice": rows["dice"].mean().float(),
            "iou": rows["iou"].mean().float(),
            "dice_pooled": torch.where(empty, 1.0, 2 * intersection / total.clamp(min=1)).float(),
            "iou_pooled": torch.where(empty, 1.0, intersection / (total - intersection).clamp(min=1)).float(),
        }
