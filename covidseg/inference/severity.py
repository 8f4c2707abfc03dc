"""Severity from lung and infection masks: how much of each lung is involved, and a 0-6 zone score.

Conventions (state them when reporting):
- Left and right are the patient's: in a standard PA view the patient's left lung is on the
  image's right. The lungs are the two largest connected components of the lung mask; a single
  component is split at the image's vertical centre line.
- Each lung is split into upper, middle and lower thirds of its own height. A zone counts when
  infection covers more than ``zone_threshold`` (default 5 %) of it; the score is the count (0-6).
- Percentages are of lung area. This is a research measurement, not a diagnostic device.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torchmetrics.functional import cohen_kappa

ZONES = ("upper", "middle", "lower")


def split_lungs(lung: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(patient_right, patient_left)`` boolean masks; the patient's right is on the image's left."""
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(lung.astype(np.uint8), connectivity=8)
    components = sorted(range(1, count), key=lambda c: stats[c, cv2.CC_STAT_AREA], reverse=True)[:2]
    if len(components) == 2:
        image_left, image_right = sorted(components, key=lambda c: centroids[c][0])
        return labels == image_left, labels == image_right
    middle = lung.shape[1] // 2
    columns = np.arange(lung.shape[1])[None, :]
    lung = lung.astype(bool)
    return lung & (columns < middle), lung & (columns >= middle)


def zone_masks(lung: np.ndarray) -> list[np.ndarray]:
    """Upper, middle and lower thirds of one lung by its height."""
    rows = np.nonzero(lung.any(axis=1))[0]
    if len(rows) == 0:
        return [lung.copy() for _ in ZONES]
    top, height = rows[0], rows[-1] - rows[0] + 1
    bounds = [top + round(height * k / 3) for k in range(4)]
    row_index = np.arange(lung.shape[0])[:, None]
    return [lung & (row_index >= bounds[k]) & (row_index < bounds[k + 1]) for k in range(3)]


def zones(lung: np.ndarray, infection: np.ndarray, zone_threshold: float = 0.05) -> dict[str, tuple[np.ndarray, bool]]:
    """Each lung's six zones by name (``right_upper`` ... ``left_lower``): the zone's mask and whether
    infection covers more than ``zone_threshold`` of it."""
    infection = infection.astype(bool)
    found = {}
    for side, side_mask in zip(("right", "left"), split_lungs(lung), strict=True):
        for zone, zone_mask in zip(ZONES, zone_masks(side_mask), strict=True):
            zone_area = zone_mask.sum()
            found[f"{side}_{zone}"] = (
                zone_mask,
                bool(zone_area > 0 and (infection & zone_mask).sum() / zone_area > zone_threshold),
            )
    return found


def severity(lung: np.ndarray, infection: np.ndarray, zone_threshold: float = 0.05) -> dict[str, float]:
    """Percent of each lung infected, of both lungs, and the zone score, for one image."""
    infection = infection.astype(bool)
    right, left = split_lungs(lung)
    result: dict[str, float] = {}
    for side, side_mask in (("right", right), ("left", left)):
        area = side_mask.sum()
        result[f"{side}_lung_infected_percent"] = 100 * float((infection & side_mask).sum() / area) if area else 0.0
    involved = {name: flag for name, (_, flag) in zones(lung, infection, zone_threshold).items()}
    result |= {f"{name}_zone": int(flag) for name, flag in involved.items()}
    score = sum(involved.values())
    lungs = right | left
    result["lung_infected_percent"] = 100 * float((infection & lungs).sum() / lungs.sum()) if lungs.any() else 0.0
    result["zone_score"] = score
    return result


def agreement(predicted: Sequence[dict], truth: Sequence[dict]) -> dict[str, float]:
    """Predicted against ground-truth severity: for the percent of both lungs infected the mean
    absolute error, Pearson's r and the Bland-Altman bias (predicted - true) with its 95 % limits
    (bias +- 1.96 SD); the mean absolute error per lung; for the zone score the exact-match and
    within-one rates and the quadratic-weighted kappa."""
    from scipy.stats import pearsonr

    def column(rows: Sequence[dict], key: str) -> np.ndarray:
        return np.array([row[key] for row in rows], dtype=float)

    predicted_percent, true_percent = column(predicted, "lung_infected_percent"), column(truth, "lung_infected_percent")
    difference = predicted_percent - true_percent
    predicted_score = torch.tensor([row["zone_score"] for row in predicted])
    true_score = torch.tensor([row["zone_score"] for row in truth])
    kappa = cohen_kappa(predicted_score, true_score, task="multiclass", num_classes=7, weights="quadratic")
    figures = {
        "severity/percent_infected_mae": float(np.abs(difference).mean()),
        "severity/percent_infected_bias": float(difference.mean()),
    }
    # figures that need two images, or percentages that vary, are left out rather than written as NaN
    if len(difference) > 1:
        spread = 1.96 * float(difference.std(ddof=1))
        figures["severity/percent_infected_limit_low"] = float(difference.mean()) - spread
        figures["severity/percent_infected_limit_high"] = float(difference.mean()) + spread
    if len(difference) > 1 and predicted_percent.std() > 0 and true_percent.std() > 0:
        figures["severity/percent_infected_pearson_r"] = float(pearsonr(predicted_percent, true_percent)[0])
    for side in ("right", "left"):
        key = f"{side}_lung_infected_percent"
        figures[f"severity/{side}_lung_percent_mae"] = float(np.abs(column(predicted, key) - column(truth, key)).mean())
    figures |= {
        "severity/zone_score_exact": float((predicted_score == true_score).float().mean()),
        "severity/zone_score_within_one": float(((predicted_score - true_score).abs() <= 1).float().mean()),
    }
    if np.isfinite(float(kappa)):  # undefined when every score, true and predicted, is the same
        figures["severity/zone_score_kappa"] = float(kappa)
    return figures
