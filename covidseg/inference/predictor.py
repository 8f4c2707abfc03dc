"""From images to probabilities, masks and presence: the one inference path.

eval, calibrate, predict, export, the HTML report and the validation-image callback all call a
:class:`Predictor`; training code never applies inference settings itself. A Predictor holds one
network or several (an ensemble: the mean of their probabilities, presence averaged the same way)
and owns what happens between the caller's images and the answer: resizing to each network's side
(inside :class:`~covidseg.models.network.SegmentationNetwork`), flip TTA, lung restriction, the
presence gate, the threshold and small-region removal. It is an ``nn.Module``, so ``export`` traces
the whole of it up to the probabilities; threshold and regions are applied to the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import lightning as L
import torch
from torch import nn

from covidseg.inference.model_spec import InferenceSettings
from covidseg.inference.regions import drop_small_regions
from covidseg.inference.xray_check import XrayCheck
from covidseg.models.network import SegmentationNetwork


class Answer(NamedTuple):
    """What a model answers for a batch (N, 1, S, S): probabilities (N, T, S, S), presence
    probabilities (N,) and x-ray scores (N,), the last two ``None`` without presence heads or without
    an x-ray check. Torch tensors from the Predictor, numpy arrays from a backend."""

    probability: Any
    presence: Any = None
    xray_score: Any = None


# images (N, 1, S, S) -> the networks' answer, as tensors
Forward = Callable[[torch.Tensor], Answer]


@dataclass
class Prediction:
    """``probability`` (N, T, H, W) after lung restriction and gate; ``mask`` = probability > threshold,
    the primary target's without its small regions (``min_region_share``); ``presence`` (N,) the mean
    presence probability (``None`` without presence heads)."""

    probability: torch.Tensor
    mask: torch.Tensor
    presence: torch.Tensor | None
    xray_score: torch.Tensor | None = None


class Predictor(nn.Module):
    """One or more networks plus inference settings.

    Args:
        networks: networks with the same targets (and all or none with a presence head).
        targets: the output channels' names, e.g. ``["lung", "infection"]``.
        settings: threshold, presence threshold, flip TTA, lung restriction and small-region removal.
        bf16: run the networks under CPU bf16 autocast (faster where the CPU has native bf16);
            probabilities, averaging, gate and threshold stay in fp32.
        xray_check: scores how far each image's encoder summary (first network, unflipped) lies
            from real X-rays' (:mod:`covidseg.inference.xray_check`); callers refuse by its threshold.
    """

    def __init__(
        self,
        networks: Sequence[SegmentationNetwork],
        targets: Sequence[str],
        settings: InferenceSettings,
        bf16: bool = False,
        xray_check: XrayCheck | None = None,
    ) -> None:
        super().__init__()
        self.bf16 = bf16
        self.xray_check = xray_check
        self.networks = nn.ModuleList(networks)
        self.targets = list(targets)
        self.settings = settings
        self.primary_target = "infection" if "infection" in self.targets else self.targets[0]
        heads = {network.presence_head is not None for network in networks}
        if len(heads) != 1:
            raise ValueError("ensemble members disagree on the presence head: all or none must have one")
        self.has_presence = heads == {True}
        if settings.presence_threshold is not None and not self.has_presence:
            raise ValueError("presence_threshold needs networks with a presence head")
        if settings.restrict_to_lungs and not {"lung", "infection"} <= set(self.targets):
            raise ValueError(f"restrict_to_lungs needs the targets lung and infection, not {self.targets}")

    @property
    def threshold(self) -> float:
        return self.settings.threshold

    def forward(self, images: torch.Tensor) -> Answer:
        """Probabilities (N, T, H, W) at the images' side, presence probabilities (N,) or ``None``,
        x-ray scores (N,) or ``None``."""
        probabilities, presences = [], []
        summary = None
        for index, network in enumerate(self.networks):
            for flipped in (False, True) if self.settings.flip_tta else (False,):
                with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    if index == 0 and not flipped and self.xray_check is not None:
                        logits, presence, summary = network.forward_with_summary(images)
                    else:
                        logits, presence = network(images.flip(-1) if flipped else images)
                probability = logits.float().sigmoid()
                probabilities.append(probability.flip(-1) if flipped else probability)
                if presence is not None:
                    presences.append(presence.float().sigmoid())
        probability = torch.stack(probabilities).mean(0)
        presence = torch.stack(presences).mean(0) if presences else None
        xray_score = None if summary is None or self.xray_check is None else self.xray_check(summary)  # fp32
        channels = list(probability.unbind(1))
        if self.settings.restrict_to_lungs:  # infection probability <= lung probability
            lung, infection = self.targets.index("lung"), self.targets.index("infection")
            channels[infection] = torch.minimum(channels[infection], channels[lung])
        if presence is not None and self.settings.presence_threshold is not None:
            primary = self.targets.index(self.primary_target)
            absent = (presence < self.settings.presence_threshold)[:, None, None]
            channels[primary] = torch.where(absent, torch.zeros_like(channels[primary]), channels[primary])
        return Answer(torch.stack(channels, 1), presence, xray_score)

    def predict(self, images: torch.Tensor, forward: Forward | None = None) -> Prediction:
        """Images (N, 1, H, W) in [0, 1] -> probabilities, masks and presence (puts it in eval mode);
        ``forward`` replaces the networks by another runtime of the same model (an exported graph)."""
        self.eval()
        with torch.inference_mode():
            probability, presence, xray_score = (forward or self)(images)
            mask = probability > self.threshold
            if self.settings.min_region_share > 0:  # on the CPU: OpenCV labels the regions
                primary = self.targets.index(self.primary_target)
                for image in mask:
                    kept = drop_small_regions(image[primary].cpu().numpy(), self.settings.min_region_share)
                    image[primary] = torch.from_numpy(kept).to(image.device)
        return Prediction(probability, mask, presence, xray_score)


class PredictorModule(L.LightningModule):
    """A Predictor under Lightning's test loop (devices, DDP, callbacks): each test step returns
    ``probability``, ``mask`` and ``presence`` for the collecting callbacks."""

    def __init__(self, predictor: Predictor, forward: Forward | None = None) -> None:
        super().__init__()
        self.predictor = predictor
        self.forward_by = forward  # another runtime of the predictor's model, e.g. OpenVINO
        self.targets = predictor.targets
        self.primary_target = predictor.primary_target

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor | None]:
        prediction = self.predictor.predict(batch["image"], self.forward_by)
        return {
            "probability": prediction.probability,
            "mask": prediction.mask,
            "presence": prediction.presence,
            "xray_score": prediction.xray_score,
        }
