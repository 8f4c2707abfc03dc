"""Attention U-Net (Oktay et al., 2018): the U-Net with attention gates on its skip connections."""

from __future__ import annotations

import torch
from torch import nn

from covidseg.models.unet import UNet


class AttentionGate(nn.Module):
    """Weights a skip feature map by a [0, 1] map computed from it and the decoder's gating signal."""

    def __init__(self, skip_channels: int, gate_channels: int, inner_channels: int) -> None:
        super().__init__()
        self.skip = nn.Conv2d(skip_channels, inner_channels, 1, bias=False)
        self.gate = nn.Conv2d(gate_channels, inner_channels, 1)
        self.score = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(inner_channels, 1, 1), nn.Sigmoid())

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return skip * self.score(self.skip(skip) + self.gate(gate))


class AttentionUNet(UNet):
    """The study's U-Net plus one attention gate per decoder level (same constructor arguments)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        widths = [block[0][0].out_channels for block in self.encoder]
        self.gates = nn.ModuleList(
            AttentionGate(widths[level], widths[level], max(1, widths[level] // 2))
            for level in reversed(range(self.depth))
        )

    def merge(self, step: int, skip: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.gates[step](skip, upsampled), upsampled], dim=1)
