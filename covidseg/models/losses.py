"""BCE-with-logits plus soft Dice: the study's combined loss."""

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


class BCEDiceLoss(nn.Module):
    """``bce_weight * BCEWithLogits + dice_weight * (1 - soft Dice)``."""

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()  # under bf16 autocast the loss and its sums stay in fp32
        bce = F.binary_cross_entropy_with_logits(logits, target)
        return self.bce_weight * bce + self.dice_weight * soft_dice_loss(logits, target, self.smooth)
