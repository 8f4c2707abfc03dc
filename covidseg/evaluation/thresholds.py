"""Choosing the inference settings on Val: each image's areas at every candidate threshold and
small-region share (:class:`ThresholdSweep`, during ``trainer.test``), then every combination
scored and the best kept under the healthy-clean floor (``calibrate``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch

from covidseg.core.errors import DataError
from covidseg.inference.regions import drop_small_regions


class ThresholdSweep(L.Callback):
    """During ``trainer.test``, each image's predicted and overlapping areas at every threshold and
    small-region share, and its presence probability (``calibrate`` scores every choice from these)."""

    def __init__(self, thresholds: Sequence[float], channel: int, region_shares: Sequence[float] = (0.0,)) -> None:
        self.thresholds = torch.tensor(list(thresholds))
        self.region_shares = list(region_shares)
        self.channel = channel
        self.predicted: list[torch.Tensor] = []
        self.intersection: list[torch.Tensor] = []
        self.truth: list[torch.Tensor] = []
        self.presence: list[torch.Tensor] = []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        probability = outputs["probability"][:, self.channel].cpu()
        truth = batch["mask"][:, self.channel].cpu() > 0.5
        predicted = probability[:, None] > self.thresholds[None, :, None, None]  # (N, thresholds, H, W)
        # (N, shares, thresholds, H, W): each mask without its small regions, per share
        kept = torch.from_numpy(
            np.stack([[[drop_small_regions(mask, share) for mask in image] for share in self.region_shares]
                      for image in predicted.numpy()])
        )  # fmt: skip
        self.predicted.append(kept.flatten(3).sum(-1).double())
        self.intersection.append((kept & truth[:, None, None]).flatten(3).sum(-1).double())
        self.truth.append(truth.flatten(1).sum(-1).double())
        if outputs.get("presence") is not None:
            self.presence.append(outputs["presence"].double().cpu())

    def areas(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted and intersection areas (images x region shares x thresholds) and truth areas (images)."""
        return tuple(torch.cat(parts).numpy() for parts in (self.predicted, self.intersection, self.truth))

    def presence_probability(self) -> np.ndarray | None:
        return torch.cat(self.presence).numpy() if self.presence else None


@dataclass
class Choice:
    threshold: float
    presence_threshold: float | None
    dice: float
    healthy_clean_rate: float
    flip_tta: bool = False
    min_region_share: float = 0.0


def score_choices(
    predicted: np.ndarray,
    intersection: np.ndarray,
    truth: np.ndarray,
    presence: np.ndarray | None,
    thresholds: list[float],
    presence_thresholds: list[float],
    max_area: float,
    flip_tta: bool = False,
    min_region_share: float = 0.0,
) -> list[Choice]:
    """Per-image Dice on infected images and clean share of healthy images, for every pair."""
    infected = truth > 0
    if not infected.any() or infected.all():
        raise DataError("calibration needs images with and without infection: set data.eval_classes to all classes")
    gates: list[float | None] = [None] + (list(presence_thresholds) if presence is not None else [])
    choices = []
    for gate in gates:
        for column, threshold in enumerate(thresholds):
            dice, area = image_scores(predicted[:, column], intersection[:, column], truth, presence, gate)
            clean = float((area[~infected] < max_area).mean())
            choices.append(Choice(threshold, gate, float(dice[infected].mean()), clean, flip_tta, min_region_share))
    return choices


def image_scores(
    predicted: np.ndarray, intersection: np.ndarray, truth: np.ndarray, presence: np.ndarray | None, gate: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """Each image's Dice and predicted area under one pixel threshold's areas and presence ``gate``."""
    kept = np.ones(len(truth), bool) if gate is None else presence >= gate
    area = np.where(kept, predicted, 0)
    overlap = np.where(kept, intersection, 0)
    total = area + truth
    return np.where(total == 0, 1.0, 2 * overlap / np.maximum(total, 1)), area


def choose(choices: list[Choice], min_healthy_rate: float) -> Choice:
    """Best Dice among choices clean enough on healthy images; else the cleanest."""
    clean = [choice for choice in choices if choice.healthy_clean_rate >= min_healthy_rate]
    if clean:
        return max(clean, key=lambda choice: choice.dice)
    return max(choices, key=lambda choice: (choice.healthy_clean_rate, choice.dice))


@dataclass
class SweepPass:
    """One pass over the images with one flip setting: areas per (image, region share, threshold)."""

    flip_tta: bool
    predicted: np.ndarray
    intersection: np.ndarray
    truth: np.ndarray
    presence: np.ndarray | None


def cross_fitted(
    passes: list[SweepPass],
    shares: list[float],
    thresholds: list[float],
    presence_thresholds: list[float],
    max_area: float,
    min_healthy_rate: float,
    seed: int,
) -> tuple[list[Choice], np.ndarray, np.ndarray]:
    """Choose on one half of the images and score on the other, both ways (halves drawn from ``seed``
    within infected and healthy images alike): an estimate of the chosen settings' Dice and clean rate
    on images that did not choose them. Returns the two halves' choices, each infected image's Dice and
    each healthy image's clean flag, each scored by the choice of the half it is not in."""
    truth = passes[0].truth
    half = np.zeros(len(truth), int)
    rng = np.random.default_rng(seed)
    for group in (truth > 0, truth == 0):
        members = np.flatnonzero(group)
        half[rng.permutation(members)[: len(members) // 2]] = 1
    chosen: list[Choice] = []
    dice, clean = np.zeros(len(truth)), np.zeros(len(truth), bool)
    for side in (0, 1):
        choosing, scored = half == side, half != side
        candidates = []
        for sweep in passes:
            presence = None if sweep.presence is None else sweep.presence[choosing]
            for column, share in enumerate(shares):
                candidates += score_choices(
                    sweep.predicted[choosing, column], sweep.intersection[choosing, column], truth[choosing],
                    presence, thresholds, presence_thresholds, max_area, sweep.flip_tta, share,
                )  # fmt: skip
        choice = choose(candidates, min_healthy_rate)
        chosen.append(choice)
        sweep = next(sweep for sweep in passes if sweep.flip_tta == choice.flip_tta)
        column = thresholds.index(choice.threshold)
        areas = (sweep.predicted[:, shares.index(choice.min_region_share), column],
                 sweep.intersection[:, shares.index(choice.min_region_share), column])  # fmt: skip
        side_dice, area = image_scores(*areas, truth, sweep.presence, choice.presence_threshold)
        dice[scored], clean[scored] = side_dice[scored], area[scored] < max_area
    infected = truth > 0
    return chosen, dice[infected], clean[~infected]
