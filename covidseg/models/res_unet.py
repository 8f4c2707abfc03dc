"""A CPU-efficient U-Net: strided stem and residual encoder, no full-resolution feature maps."""

from __future__ import annotations

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

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_width: int = 32,
        depth: int = 4,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(in_channels, out_channels, base_width, depth, norm_layer, act_layer)
        widths = [base_width * 2**level for level in range(depth + 1)]
        blocks = {"norm_layer": norm_layer, "act_layer": act_layer}
        stem = nn.Sequential(
            ConvNormAct(in_channels, widths[0], stride=2, **blocks), ResidualBlock(widths[0], widths[0], **blocks)
        )
        downs = (ResidualBlock(widths[level - 1], widths[level], stride=2, **blocks) for level in range(1, depth + 1))
        self.encoder = nn.ModuleList([stem, *downs])

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        return skips

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.head(features), scale_factor=2, mode="bilinear", align_corners=False)
