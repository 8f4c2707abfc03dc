"""BCE-with-logits plus soft Dice (the study's combined loss), optionally plus the Lovász hinge
and the focal Tversky loss.

The Lovász hinge (Berman et al., CVPR 2018) is written here rather than taken from a package: the
packages that ship it (segmentation_models_pytorch, pytorch-toolbelt) pull in torchvision, which
this CPU-only project keeps out. It is the convex surrogate of 1 - IoU, computed per image, so it
aims at the per-image metric the project reports. The focal Tversky loss (Abraham and Khan, ISBI
2019) weighs missed pixels above false alarms (alpha 0.7, beta 0.3) and focuses on hard images
(exponent 0.75), for small lesions; a few lines of arithmetic, like soft Dice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per image and channel, averaged; ``smooth`` makes empty/empty score 0 loss."""
    prob = logits.sigmoid().flatten(2)
    target = target.flatten(2)
    intersection = (prob * target).sum(-1)
    total = prob.sum(-1) + target.sum(-1)
    return (1 - (2 * intersection + smooth) / (total + smooth)).mean()


def focal_tversky_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.7, beta: float = 0.3, gamma: float = 0.75
) -> torch.Tensor:
    """(1 - Tversky index) ** gamma per image and channel, averaged; alpha weighs misses, beta false alarms."""
    prob = logits.sigmoid().flatten(2)
    target = target.flatten(2)
    true_positive = (prob * target).sum(-1)
    missed = ((1 - prob) * target).sum(-1)
    false_alarm = (prob * (1 - target)).sum(-1)
    tversky = (true_positive + 1) / (true_positive + alpha * missed + beta * false_alarm + 1)
    return ((1 - tversky).clamp(min=1e-6) ** gamma).mean()  # finite gradient at a perfect image


def lovasz_hinge_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Lovász hinge per image and channel, averaged: errors sorted, weighted by the Jaccard steps."""
    logits = logits.flatten(2)
    target = target.flatten(2)
    errors = 1 - logits * (2 * target - 1)
    errors_sorted, order = errors.sort(dim=-1, descending=True)
    target_sorted = target.gather(-1, order)
    positives = target_sorted.sum(-1, keepdim=True)
    intersection = positives - target_sorted.cumsum(-1)
    union = positives + (1 - target_sorted).cumsum(-1)
    jaccard = 1 - intersection / union
    jaccard_steps = torch.cat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], dim=-1)
    return (F.relu(errors_sorted) * jaccard_steps).sum(-1).mean()


class BCEDiceLoss(nn.Module):
    """``bce_weight * BCEWithLogits + dice_weight * (1 - soft Dice) + lovasz_weight * Lovász hinge
    + focal_tversky_weight * focal Tversky``."""

    def __init__(
        self,
        bce_weight: float = 1.0,
        dice_weight: float = 1.0,
        smooth: float = 1.0,
        lovasz_weight: float = 0.0,
        focal_tversky_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth
        self.lovasz_weight = lovasz_weight
        self.focal_tversky_weight = focal_tversky_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # under bf16 autocast the loss and its sums stay in fp32
        bce = F.binary_cross_entropy_with_logits(logits, target)
        loss = self.bce_weight * bce + self.dice_weight * soft_dice_loss(logits, target, self.smooth)
        if self.lovasz_weight:
            loss = loss + self.lovasz_weight * lovasz_hinge_loss(logits, target)
        if self.focal_tversky_weight:
            loss = loss + self.focal_tversky_weight * focal_tversky_loss(logits, target)
        return loss
