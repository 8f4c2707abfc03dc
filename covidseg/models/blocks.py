"""Building blocks shared by the segmentation networks."""

from __future__ import annotations

import torch
from torch import nn


class ConvNormAct(nn.Sequential):
    """3x3 convolution, normalisation, activation (no conv bias: the norm has one)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
        stride: int = 1,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False),
            norm_layer(out_channels),
            act_layer(inplace=True),
        )


class DoubleConv(nn.Sequential):
    """Two ConvNormAct layers: the unit of every U-Net level."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(
            ConvNormAct(in_channels, out_channels, norm_layer=norm_layer, act_layer=act_layer),
            ConvNormAct(out_channels, out_channels, norm_layer=norm_layer, act_layer=act_layer),
        )


class ResidualBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions plus a shortcut (1x1 projection when the shape
    changes); ``stride=2`` halves the resolution instead of a pooling layer."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvNormAct(in_channels, out_channels, norm_layer=norm_layer, act_layer=act_layer, stride=stride),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            norm_layer(out_channels),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_channels == out_channels
            else nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), norm_layer(out_channels))
        )
        self.act = act_layer(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))
