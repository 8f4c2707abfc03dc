"""A CPU-efficient U-Net: strided stem and residual encoder, no full-resolution feature maps."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from covidseg.models.blocks import ConvNormAct, ResidualBlock
from covidseg.models.unet import UNet


class ResUNet(UNet):
    """The U-Net's decoder on a residual encoder whose stride-2 stem starts at half resolution.

    The study's U-Net spends most of its FLOPs on 32- and 64-channel maps at full resolution,
    where 2 CPU cores run far below their matrix-multiply rate. Here the first level already
    works at half resolution, levels are joined by stride-2 residual blocks instead of pooling, and
    the logits are upsampled bilinearly. Inputs must have sides divisible by ``2**(depth + 1)``.
    """

    def build_encoder(self, in_channels: int, widths: list[int], blocks: dict[str, Any]) -> nn.ModuleList:
        """A stride-2 stem then one stride-2 residual block per level (no pooling)."""
        stem = nn.Sequential(
            ConvNormAct(in_channels, widths[0], stride=2, **blocks), ResidualBlock(widths[0], widths[0], **blocks)
        )
        downs = (ResidualBlock(c_in, c_out, stride=2, **blocks) for c_in, c_out in pairwise(widths))
        return nn.ModuleList([stem, *downs])

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        return skips

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.head(features), scale_factor=2, mode="bilinear", align_corners=False)
