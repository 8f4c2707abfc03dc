"""U-Net++ (Zhou et al., 2018): nested, dense skip pathways between encoder and decoder."""

from __future__ import annotations

import torch
from torch import nn

from covidseg.models.blocks import DoubleConv


class UNetPlusPlus(nn.Module):
    """Node ``X[i][j]`` (level ``i``, column ``j``) convolves the concatenation of ``X[i][0..j-1]``
    and the upsampled ``X[i+1][j-1]``. With ``deep_supervision`` the logits are the mean of the
    heads on ``X[0][1..depth]``, so the loss sees every nested decoder.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_width: int = 32,
        depth: int = 4,
        deep_supervision: bool = False,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.depth = in_channels, out_channels, depth
        self.deep_supervision = deep_supervision
        widths = [base_width * 2**level for level in range(depth + 1)]
        blocks = {"norm_layer": norm_layer, "act_layer": act_layer}
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        encoder_inputs = [in_channels, *widths[:-1]]
        self.nodes = nn.ModuleDict()
        for j in range(depth + 1):
            for i in range(depth + 1 - j):
                c_in = encoder_inputs[i] if j == 0 else j * widths[i] + widths[i + 1]
                self.nodes[f"{i}_{j}"] = DoubleConv(c_in, widths[i], **blocks)
        heads = depth if deep_supervision else 1
        self.heads = nn.ModuleList(nn.Conv2d(widths[0], out_channels, 1) for _ in range(heads))
        self.bottleneck_channels = widths[-1]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder column ``X[0..depth][0]``, finest first."""
        column: list[torch.Tensor] = []
        for i in range(self.depth + 1):
            column.append(self.nodes[f"{i}_0"](x if i == 0 else self.pool(column[-1])))
        return column

    def decode(self, skips: list[torch.Tensor]) -> list[torch.Tensor]:
        """The top row ``X[0][1..depth]`` from the encoder column."""
        grid = {(i, 0): skip for i, skip in enumerate(skips)}
        for j in range(1, self.depth + 1):
            for i in range(self.depth + 1 - j):
                inputs = [grid[i, k] for k in range(j)] + [self.up(grid[i + 1, j - 1])]
                grid[i, j] = self.nodes[f"{i}_{j}"](torch.cat(inputs, dim=1))
        return [grid[0, j] for j in range(1, self.depth + 1)]

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.decode(self.encode(x))

    def forward_head(self, features: list[torch.Tensor]) -> torch.Tensor:
        if not self.deep_supervision:
            return self.heads[0](features[-1])
        return torch.stack([head(f) for head, f in zip(self.heads, features, strict=True)]).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
