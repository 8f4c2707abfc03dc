"""Is model B better than model A on the same images, and by how much: paired statistics over two
or more ``eval`` run folders.

Every figure pairs the models image by image. The difference of each figure (B minus A) gets a
95 % interval from a paired bootstrap over the images and a paired test of the same difference: a
paired permutation test (each image's A and B swapped at random, so it tests the difference the
interval describes, where Wilcoxon's signed-rank test would test a median) for the mean per-image
Dice and IoU and for the pooled Dice, and an exact binomial test on the images where the two
disagree for the healthy clean rate (McNemar's). Where the runs hold both infected and healthy images
(an eval of every class, the images ``calibrate`` chooses on), the mean per-image Dice of the infected
images alone (``dice_infected``) is reported too: the figure calibrate maximises under its healthy
floor, which ``dice`` (over every image, as eval's ``test/dice``) mixes with the healthy images' 0 or 1.
With more than one B, the p-values of each figure are adjusted for
the number of comparisons (Benjamini-Hochberg). All from SciPy. Runs evaluated on other images,
another split or other classes are refused.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from covidseg.core.errors import DataError
from covidseg.core.files import printable, read_file_bytes, read_plain_yaml
from covidseg.core.metrics import CLEAN_AREA_SHARE
from covidseg.core.run_files import read_run_file
from covidseg.evaluation.intervals import bootstrap_interval, mean_of, pooled_dice
from covidseg.inference.segment import BACKENDS

MAX_TABLE_BYTES = 256 << 20  # per_image.csv: about 100 bytes an image
MAX_CONFIG_BYTES = 1 << 20
SAME_SETTINGS = ("split", "classes", "eval_classes", "num_folds", "fold")  # what picks the evaluated images


@dataclass
class EvalRun:
    """An eval run folder's per-image results of its primary target, and what it was run on."""

    folder: Path
    names: list[str]
    dice: np.ndarray
    iou: np.ndarray
    intersection: np.ndarray
    truth: np.ndarray
    predicted: np.ndarray
    settings: dict[str, Any]
    image_size: int
    backend: str = "not recorded"  # what ran, from run_info.json (evals before covidseg recorded it: not said)


def read_eval_run(folder: Path) -> EvalRun:
    """``per_image.csv`` and the recorded config of an ``eval`` run folder, read as untrusted files."""
    table = folder / "per_image.csv"
    if not table.is_file():
        raise DataError(f"{printable(folder)!r} has no per_image.csv: give the run folder of a finished eval")
    text = read_file_bytes(table, MAX_TABLE_BYTES, "an eval's per_image.csv", DataError).decode("utf-8", "replace")
    rows = list(csv.DictReader(io.StringIO(text)))
    target = "infection" if rows and "dice_infection" in rows[0] else "lung"
    needed = [f"{key}_{target}" for key in ("dice", "iou", "intersection", "truth_area", "predicted_area")]
    if not rows or any(key not in rows[0] for key in ["file", *needed]):
        raise DataError(f"{printable(table)!r} is not an eval's per_image.csv (expected columns file, {needed[0]}...)")
    try:
        values = {key: np.array([float(row[key]) for row in rows]) for key in needed}
    except (TypeError, ValueError) as error:
        raise DataError(f"{printable(table)!r}: a value is not a number ({error})") from None
    if not all(np.isfinite(column).all() for column in values.values()):
        raise DataError(f"{printable(table)!r} holds NaN or infinite values")
    recorded = folder / ".hydra" / "config.yaml"
    if not recorded.is_file():
        raise DataError(f"{printable(folder)!r} has no .hydra/config.yaml: which images it scored is unknown")
    config = read_plain_yaml(recorded, MAX_CONFIG_BYTES, "an eval's recorded config", DataError)
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict):
        raise DataError(f"{printable(recorded)!r} has no data section: not an eval's recorded config")
    scored = read_run_file(folder / "intervals.json")  # the model's own side and target, as eval scored them
    image_size, scored_target = scored.get("image_size"), scored.get("target")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1 or scored_target != target:
        raise DataError(
            f"{printable(folder / 'intervals.json')!r} does not say the side and target this eval scored "
            f"(image_size={image_size!r}, target={scored_target!r}): evaluate the model again with this covidseg"
        )
    return EvalRun(
        folder=folder,
        names=[row["file"] for row in rows],
        dice=values[needed[0]],
        iou=values[needed[1]],
        intersection=values[needed[2]],
        truth=values[needed[3]],
        predicted=values[needed[4]],
        settings={f"data.{key}": data.get(key) for key in SAME_SETTINGS} | {"image_size": image_size, "target": target},
        image_size=image_size,
        backend=recorded_backend(folder / "run_info.json"),
    )


def recorded_backend(path: Path) -> str:
    """The backend an eval says it ran (``run_info.json``: ``backend``, ``bf16``), as text for people;
    "not recorded" where an earlier eval did not say; anything else in those keys is one line."""
    if not os.path.lexists(path):
        return "not recorded"
    info = read_run_file(path)
    backend, bf16 = info.get("backend"), info.get("bf16")
    if backend is None:
        return "not recorded"
    ran = [name for name in BACKENDS if name != "auto"]  # auto is a choice, not what ran
    if backend not in ran or not isinstance(bf16, bool):
        raise DataError(
            f"{printable(path)!r}: backend={str(backend)[:40]!r}, bf16={str(bf16)[:10]!r}: expected a backend eval "
            f"runs ({', '.join(ran)}) and true or false"
        )
    return f"{backend}, {'bf16' if bf16 else 'fp32'}"


def check_comparable(runs: Sequence[EvalRun]) -> None:
    """The same images in the same order, picked by the same settings; else one line saying which."""
    first = runs[0]
    folders = [os.path.realpath(run.folder) for run in runs]
    repeated = next((folder for folder in folders if folders.count(folder) > 1), None)
    if repeated is not None:
        raise DataError(f"{printable(repeated)!r} is given twice: compare different eval runs")
    for run in runs[1:]:
        for key in run.settings:
            if run.settings[key] != first.settings[key]:
                raise DataError(
                    f"{printable(run.folder)!r} was evaluated with {key}={run.settings[key]!r}, "
                    f"{printable(first.folder)!r} with {first.settings[key]!r}: compare runs on the same images"
                )
        if run.names != first.names:
            differ = next(
                (pair for pair in zip(first.names, run.names, strict=False) if pair[0] != pair[1]),
                (f"{len(first.names)} images", f"{len(run.names)} images"),
            )
            raise DataError(
                f"{printable(run.folder)!r} and {printable(first.folder)!r} scored other images ({differ[1]!r} "
                f"where {differ[0]!r}): compare runs on the same images"
            )


def infected_apart(run: EvalRun) -> np.ndarray | None:
    """Which images hold infection, where the run scored healthy ones too (an eval of every class);
    ``None`` where all its images are of one kind."""
    infected = run.truth > 0
    return infected if infected.any() and not infected.all() else None


def _difference(statistic, a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...]):
    """``statistic`` of B minus that of A, over the same resampled images."""
    count = len(a)

    def difference(*samples: np.ndarray, axis: int = -1) -> np.ndarray:
        return statistic(*samples[count:], axis=axis) - statistic(*samples[:count], axis=axis)

    return difference


def compare(runs: Sequence[EvalRun], resamples: int = 2000, seed: int = 42) -> list[dict[str, Any]]:
    """One row per figure and model: its value and interval, and for every model after the first
    the difference from the first, its interval, the paired test and the adjusted p-value."""
    check_comparable(runs)
    reference = runs[0]
    clean_area = CLEAN_AREA_SHARE * reference.image_size**2
    healthy = reference.truth == 0
    infected = infected_apart(reference)

    def figures(run: EvalRun) -> dict[str, tuple]:
        found = {
            "dice": (mean_of, (run.dice,)),
            "iou": (mean_of, (run.iou,)),
            "dice_pooled": (pooled_dice, (run.intersection, run.truth, run.predicted)),
        }
        if infected is not None:
            found["dice_infected"] = (mean_of, (run.dice[infected],))
        if healthy.any():
            found["healthy_clean"] = (mean_of, ((run.predicted[healthy] < clean_area).astype(float),))
        return found

    rows: list[dict[str, Any]] = []
    per_run = [figures(run) for run in runs]  # per run: figure -> (statistic, per-image samples)
    for name in per_run[0]:
        for index, run in enumerate(runs):
            statistic, samples = per_run[index][name]
            low, high = bootstrap_interval(statistic, samples, resamples, seed)
            row = {"figure": name, "model": str(run.folder), "images": len(samples[0]),
                   "value": float(statistic(*samples, axis=-1)), "low": low, "high": high}  # fmt: skip
            if index:
                _, base = per_run[0][name]
                difference = _difference(statistic, base, samples)
                row["difference"] = float(difference(*base, *samples))
                row["difference_low"], row["difference_high"] = bootstrap_interval(
                    difference, (*base, *samples), resamples, seed
                )
                row["test"], row["p"] = paired_test(name, base, samples, resamples, seed)
            rows.append(row)
        tested = [row for row in rows if row["figure"] == name and "p" in row]
        for row, adjusted in zip(tested, stats.false_discovery_control([row["p"] for row in tested]), strict=True):
            row["p_adjusted"] = float(adjusted)
    return rows


def paired_test(
    name: str, a: tuple[np.ndarray, ...], b: tuple[np.ndarray, ...], resamples: int, seed: int
) -> tuple[str, float]:
    """The paired test of figure ``name`` (B against A) and its two-sided p-value."""
    if name == "healthy_clean":
        a_clean, b_clean = a[0].astype(bool), b[0].astype(bool)
        only_b, only_a = int((b_clean & ~a_clean).sum()), int((a_clean & ~b_clean).sum())
        if only_a + only_b == 0:
            return "McNemar exact (no image differs)", 1.0
        return "McNemar exact", float(stats.binomtest(only_b, only_a + only_b).pvalue)
    if name == "dice_pooled":  # each image's (intersection, truth, predicted) of A swapped with B's whole

        def pooled_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
            return pooled_dice(*np.moveaxis(y, -2, 0)) - pooled_dice(*np.moveaxis(x, -2, 0))

        result = stats.permutation_test(
            (np.stack(a), np.stack(b)), pooled_difference, permutation_type="samples", n_resamples=resamples,
            vectorized=True, axis=-1, rng=np.random.default_rng(seed),
        )  # fmt: skip
        return "paired permutation", float(result.pvalue)
    if not np.any(b[0] - a[0]):
        return "paired permutation (no image differs)", 1.0

    def mean_difference(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(y, axis=axis) - np.mean(x, axis=axis)

    result = stats.permutation_test(
        (a[0], b[0]), mean_difference, permutation_type="samples", n_resamples=resamples, vectorized=True,
        rng=np.random.default_rng(seed),
    )  # fmt: skip
    return "paired permutation", float(result.pvalue)
