"""The classic U-Net (Ronneberger et al., 2015) as used by the reference study."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from covidseg.models.blocks import DoubleConv


class UNet(nn.Module):
    """Encoder-decoder with skip connections; widths ``base_width * 2**level``.

    The defaults (widths 32-64-128-256-512, BatchNorm, ReLU) give the study's 7.76M parameters.
    Inputs must have sides divisible by ``2**depth``.
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
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.depth = depth
        widths = [base_width * 2**level for level in range(depth + 1)]
        blocks = {"norm_layer": norm_layer, "act_layer": act_layer}
        self.encoder = self.build_encoder(in_channels, widths, blocks)
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.ModuleList(
            nn.ConvTranspose2d(widths[level + 1], widths[level], 2, stride=2) for level in reversed(range(depth))
        )
        self.decoder = nn.ModuleList(
            DoubleConv(2 * widths[level], widths[level], **blocks) for level in reversed(range(depth))
        )
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        self.bottleneck_channels = widths[-1]

    def build_encoder(self, in_channels: int, widths: list[int], blocks: dict[str, Any]) -> nn.ModuleList:
        """One block per level (``widths[level]`` channels); ``encode`` pools between them."""
        return nn.ModuleList(
            DoubleConv(c_in, c_out, **blocks) for c_in, c_out in zip([in_channels, *widths[:-1]], widths, strict=True)
        )

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature map of every encoder level, finest first."""
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        return skips

    def merge(self, step: int, skip: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
        """Join a skip connection with the upsampled decoder features (decoder step ``step``)."""
        return torch.cat([skip, upsampled], dim=1)

    def decode(self, skips: list[torch.Tensor]) -> torch.Tensor:
        """The finest decoder features from the encoder's feature maps (as ``encode`` returns them)."""
        skips = list(skips)
        x = skips.pop()
        for step, (up, block) in enumerate(zip(self.upsample, self.decoder, strict=True)):
            x = block(self.merge(step, skips.pop(), up(x)))
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
