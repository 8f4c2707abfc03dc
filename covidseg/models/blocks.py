"""Building blocks shared by the segmentation networks."""

from __future__ import annotations

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
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
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
