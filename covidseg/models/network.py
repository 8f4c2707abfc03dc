"""A segmentation network as training and inference both use it: resizing to the network's
input side, NHWC memory format, and the optional presence head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SegmentationNetwork(nn.Module):
    """Wraps ``net`` so that it takes images of any side and returns ``(logits, presence)``.

    Args:
        net: a network returning one logit channel per target; with ``presence_head`` it must
            expose ``encode``, ``decode``, ``forward_head`` and ``bottleneck_channels``.
        presence_head: add a head (global average pool of the deepest encoder features, then a
            linear layer) whose logit says whether the primary target is present at all.
        input_size: run ``net`` at this side (area-downsampled input); the logits are upsampled
            bilinearly to the input's side, so losses and metrics stay at full resolution.
        channels_last: run ``net`` in NHWC memory format (faster oneDNN convolutions on CPU).

    ``train_input_size`` (set by progressive resizing) overrides ``input_size`` in training mode.
    """

    def __init__(
        self, net: nn.Module, presence_head: bool = False, input_size: int | None = None, channels_last: bool = False
    ) -> None:
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last) if channels_last else net
        self.input_size = input_size
        self.channels_last = channels_last
        self.train_input_size: int | None = None
        self.presence_head = None
        if presence_head:
            if not all(hasattr(net, name) for name in ("encode", "decode", "forward_head", "bottleneck_channels")):
                raise ValueError(f"a presence head needs a net with encode/decode; {type(net).__name__} has none")
            self.presence_head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(net.bottleneck_channels, 1), nn.Flatten(0)
            )

    @property
    def in_channels(self) -> int:
        return getattr(self.net, "in_channels", 1)

    @property
    def out_channels(self) -> int | None:
        return getattr(self.net, "out_channels", None)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits at the images' side and presence logits (``None`` without a presence head)."""
        logits, presence, _ = self._run(images, summarize=False)
        return logits, presence

    def forward_with_summary(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """:meth:`forward` plus the encoder's summary (N, D): each encoder level's channel means,
        finest first (what :mod:`covidseg.inference.xray_check` compares with real X-rays)."""
        logits, presence, summary = self._run(images, summarize=True)
        assert summary is not None
        return logits, presence, summary

    def summary_width(self) -> int:
        """D of :meth:`forward_with_summary`: the channels of every encoder level together."""
        parameter = next(self.parameters())
        side = self.input_size or 256
        probe = torch.zeros(1, self.in_channels, side, side, dtype=parameter.dtype, device=parameter.device)
        training = self.training
        try:  # in eval mode: a probe in training mode would move BatchNorm's running statistics
            with torch.no_grad():
                return sum(features.shape[1] for features in self.eval().net.encode(probe))
        finally:
            self.train(training)

    def _run(
        self, images: torch.Tensor, summarize: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        size = images.shape[-2:]
        input_size = (self.training and self.train_input_size) or self.input_size
        if input_size and tuple(size) != (input_size, input_size):
            images = F.interpolate(images, size=(input_size, input_size), mode="area")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        presence = summary = None
        if self.presence_head is None and not summarize:
            logits = self.net(images)
        else:
            features = self.net.encode(images)
            if self.presence_head is not None:
                presence = self.presence_head(features[-1])
            if summarize:
                summary = torch.cat([level.float().mean((2, 3)) for level in features], 1)
            logits = self.net.forward_head(self.net.decode(features))
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits, presence, summary
