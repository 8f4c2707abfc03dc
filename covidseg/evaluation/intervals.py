"""95 % intervals for what ``eval`` reports: a bootstrap over the evaluated images.

Each figure is recomputed on images drawn with replacement from the evaluated ones
(``scipy.stats.bootstrap``; BCa, seeded, so a rerun gives the same interval): the mean per-image
Dice and IoU, the pooled Dice and IoU (sums of the resampled images' areas), and the healthy clean
rate (the share of images without infection predicted almost empty), and for lung + infection
models the severity agreement (percent of the lungs infected: MAE, bias, Pearson's r; zone score:
exact, within one, quadratic-weighted kappa). On 466 Val X-rays the mean
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
        # over the resamples where the figure is defined (a kappa or r of identical scores is not)
        distribution = result.bootstrap_distribution[np.isfinite(result.bootstrap_distribution)]
        if len(distribution) < 0.9 * resamples:  # too few to place an interval: none is given
            return float("nan"), float("nan")
        low, high = (float(q) for q in np.percentile(distribution, [2.5, 97.5]))
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


def pearson_r(predicted: np.ndarray, true: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pearson's correlation of paired values (NaN where either does not vary)."""
    predicted = predicted - predicted.mean(axis=axis, keepdims=True)
    true = true - true.mean(axis=axis, keepdims=True)
    scale = np.sqrt((predicted**2).sum(axis=axis) * (true**2).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip((predicted * true).sum(axis=axis) / scale, -1.0, 1.0)


def quadratic_kappa(predicted: np.ndarray, true: np.ndarray, axis: int = -1) -> np.ndarray:
    """Cohen's kappa with quadratic weights of paired scores: 1 - the mean squared disagreement over
    the one expected of independent scores with the same distributions (variances and means), the
    closed form of the weighted confusion matrix, so that all resamples are computed at once."""
    observed = ((predicted - true) ** 2).mean(axis=axis)
    expected = predicted.var(axis=axis) + true.var(axis=axis) + (predicted.mean(axis=axis) - true.mean(axis=axis)) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1 - observed / expected


def severity_figures(columns: Mapping[str, list[float]]) -> dict[str, tuple[Callable[..., np.ndarray], tuple]]:
    """The severity agreement figures (:func:`covidseg.inference.severity.agreement`) as statistics
    of per-image columns: percent of the lungs infected (MAE, bias, r) and zone score (exact,
    within one, kappa)."""

    def column(name: str) -> np.ndarray:
        return np.asarray(columns[name], dtype=float)

    predicted, true = column("predicted_lung_infected_percent"), column("true_lung_infected_percent")
    predicted_score, true_score = column("predicted_zone_score"), column("true_zone_score")
    difference, score_difference = predicted - true, np.abs(predicted_score - true_score)
    figures: dict[str, tuple[Callable[..., np.ndarray], tuple]] = {
        "severity/percent_infected_mae": (mean_of, (np.abs(difference),)),
        "severity/percent_infected_bias": (mean_of, (difference,)),
        "severity/zone_score_exact": (mean_of, ((score_difference == 0).astype(float),)),
        "severity/zone_score_within_one": (mean_of, ((score_difference <= 1).astype(float),)),
    }
    if predicted.std() > 0 and true.std() > 0:
        figures["severity/percent_infected_pearson_r"] = (pearson_r, (predicted, true))
    if np.isfinite(quadratic_kappa(predicted_score, true_score)):
        figures["severity/zone_score_kappa"] = (quadratic_kappa, (predicted_score, true_score))
    return figures


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
    if "predicted_lung_infected_percent" in columns:  # a lung + infection model
        figures |= severity_figures(columns)
    intervals = {}
    for name, (statistic, samples) in figures.items():
        low, high = bootstrap_interval(statistic, samples, resamples, seed)
        if np.isfinite(low) and np.isfinite(high):  # else the figure is printed without an interval
            value = float(statistic(*samples, axis=-1))
            intervals[name] = {"value": value, "low": low, "high": high, "images": len(samples[0])}
    return intervals
