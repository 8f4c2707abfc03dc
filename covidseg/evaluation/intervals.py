"""95 % intervals for what ``eval`` reports: a bootstrap over the evaluated images.

Each figure is recomputed on images drawn with replacement from the evaluated ones
(``scipy.stats.bootstrap``; BCa, seeded, so a rerun gives the same interval): the mean per-image
Dice and IoU, the pooled Dice and IoU (sums of the resampled images' areas), and the healthy clean
rate (the share of images without infection predicted almost empty). On 466 Val X-rays the mean
per-image Dice of the shipped model moves by about ±0.02 this way: differences of 0.002 between
two models are within it, which is what ``compare``'s paired tests are for.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import numpy as np
from scipy import stats

from covidseg.core.errors import ConfigError

CONFIDENCE = 0.95
MIN_RESAMPLES, MAX_RESAMPLES = 100, 100_000


def check_resamples(resamples: object) -> int:
    """``stats.resamples``: a whole number of bootstrap resamples, enough for a 95 % interval."""
    if isinstance(resamples, bool) or not isinstance(resamples, int) or not MIN_RESAMPLES <= resamples <= MAX_RESAMPLES:
        raise ConfigError(
            f"stats.resamples={resamples!r}: expected a whole number from {MIN_RESAMPLES} to {MAX_RESAMPLES:,}"
        )
    return resamples


def bootstrap_interval(
    statistic: Callable[..., np.ndarray], samples: tuple[np.ndarray, ...], resamples: int, seed: int
) -> tuple[float, float]:
    """The BCa interval of ``statistic`` over paired ``samples`` (one value of each per image); a
    statistic that cannot vary (every image alike) is its own interval."""
    value = float(statistic(*samples, axis=-1))
    if all(np.all(sample == sample[0]) for sample in samples) or len(samples[0]) < 2:
        return value, value
    with warnings.catch_warnings():  # a degenerate BCa is replaced below
        warnings.simplefilter("ignore", (stats.DegenerateDataWarning, RuntimeWarning))
        result = stats.bootstrap(
            samples,
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=resamples,
            confidence_level=CONFIDENCE,
            method="BCa",
            rng=np.random.default_rng(seed),
        )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if not (np.isfinite(low) and np.isfinite(high)):  # BCa undefined (e.g. one image differs): percentile
        low, high = (float(q) for q in np.percentile(result.bootstrap_distribution, [2.5, 97.5]))
    return low, high


# The statistics resampled: each takes per-image values (along ``axis``, the images) and returns the
# figure, for all resamples at once (scipy's vectorised form).


def mean_of(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """The mean of per-image values (Dice, IoU, clean or not)."""
    return np.mean(values, axis=axis)


def pooled_dice(intersection: np.ndarray, truth: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    """Dice of all pixels of the images together (1 when neither truth nor prediction has any)."""
    total = truth.sum(axis=axis) + predicted.sum(axis=axis)
    return np.where(total > 0, 2 * intersection.sum(axis=axis) / np.maximum(total, 1), 1.0)


def pooled_iou(intersection: np.ndarray, truth: np.ndarray, predicted: np.ndarray, axis: int = -1) -> np.ndarray:
    """IoU of all pixels of the images together (1 when neither truth nor prediction has any)."""
    union = truth.sum(axis=axis) + predicted.sum(axis=axis) - intersection.sum(axis=axis)
    return np.where(union > 0, intersection.sum(axis=axis) / np.maximum(union, 1), 1.0)


def eval_intervals(
    columns: Mapping[str, list[float]], target: str, clean_area: float, resamples: int, seed: int
) -> dict[str, dict[str, float]]:
    """``{metric: {value, low, high}}`` for eval's figures of ``target`` from its per-image columns
    (``dice_<target>``, ``iou_<target>``, areas); ``clean_area``: the predicted area under which an
    image without infection counts as clean."""
    dice, iou = (np.asarray(columns[f"{key}_{target}"], dtype=float) for key in ("dice", "iou"))
    areas = tuple(np.asarray(columns[f"{key}_{target}"], dtype=float) for key in ("intersection", "truth_area",
                                                                                   "predicted_area"))  # fmt: skip
    figures = {
        "test/dice": (mean_of, (dice,)),
        "test/iou": (mean_of, (iou,)),
        "test/dice_pooled": (pooled_dice, areas),
        "test/iou_pooled": (pooled_iou, areas),
    }
    healthy = areas[1] == 0
    if healthy.any():
        figures["test/empty_truth_clean"] = (mean_of, ((areas[2][healthy] < clean_area).astype(float),))
    intervals = {}
    for name, (statistic, samples) in figures.items():
        low, high = bootstrap_interval(statistic, samples, resamples, seed)
        value = float(statistic(*samples, axis=-1))
        intervals[name] = {"value": value, "low": low, "high": high, "images": len(samples[0])}
    return intervals
