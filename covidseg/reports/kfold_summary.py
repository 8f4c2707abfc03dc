"""A k-fold multirun's metrics across folds: mean and standard deviation of each
(``python -m covidseg.kfold_summary <multirun folder>``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from covidseg.core.errors import ConfigError, DataError
from covidseg.core.run_files import kfold_folds, read_run_file


def read_metrics(path: Path) -> dict[str, float]:
    """A job's ``metrics.json``: names to finite numbers, or one line naming the file."""
    metrics = read_run_file(path)
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise DataError(f"{str(path)!r}: {name}={value!r}, expected a finite number")
    return metrics


def summarise(multirun_dir: Path, allow_missing_folds: bool = False) -> dict[str, dict[str, float]]:
    """``{metric: {mean, std, n}}`` over the jobs' ``metrics.json`` (std with n-1); a k-fold multirun
    without a finished run of every fold is refused unless ``allow_missing_folds``."""
    if not (multirun_dir / "multirun.yaml").is_file():
        raise ConfigError(
            f"{str(multirun_dir)!r} has no multirun.yaml: not the folder of a multirun "
            "(python -m covidseg.train -m ...), into which the summary is written"
        )
    folds = kfold_folds(sorted(path.parent for path in multirun_dir.glob("*/.hydra")), DataError)
    if folds is not None and folds.missing and not allow_missing_folds:
        raise DataError(
            f"{str(multirun_dir)!r} has no finished run of fold(s) {folds.describe_missing()} (a metrics.json): "
            "finish them, or summarise the folds that finished with --allow-missing-folds"
        )
    runs = [read_metrics(path) for path in sorted(multirun_dir.glob("*/metrics.json"))]
    if not runs:
        raise DataError(f"no */metrics.json under {str(multirun_dir)!r}: has the multirun finished a job?")
    names = sorted(set.intersection(*(set(run) for run in runs)))
    summary = {}
    for name in names:
        if name.split("/")[0] in ("val", "test", "severity"):
            values = np.array([run[name] for run in runs], dtype=float)
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            summary[name] = {"mean": float(values.mean()), "std": std, "n": len(values)}
    return summary


def markdown(summary: dict[str, dict[str, float]]) -> str:
    lines = ["| metric | mean | std | folds |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {s['mean']:.4f} | {s['std']:.4f} | {s['n']} |" for name, s in summary.items()]
    return "\n".join(lines) + "\n"
