"""A k-fold multirun's metrics across folds: mean and standard deviation of each
(``python -m covidseg.kfold_summary <multirun folder>``)."""

from __future__ import annotations

import math
import os
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
    """``{metric: {mean, std, min, max, n}}`` over the jobs' ``metrics.json`` (std with n-1): the
    spread across folds, or across seeds for a multirun over ``seed=...``; a k-fold multirun without
    a finished run of every fold is refused unless ``allow_missing_folds``."""
    if not (multirun_dir / "multirun.yaml").is_file():
        raise ConfigError(
            f"{str(multirun_dir)!r} has no multirun.yaml: not the folder of a multirun "
            "(python -m covidseg.train -m ...), into which the summary is written"
        )
    jobs = sorted({path.parent for pattern in ("*/.hydra", "*/metrics.json") for path in multirun_dir.glob(pattern)})
    folds = kfold_folds(jobs, DataError)
    if folds is not None and folds.incomplete and not allow_missing_folds:
        raise DataError(
            f"{str(multirun_dir)!r} has {folds.describe_missing()}: finish or remove them, or summarise the folds "
            "that finished with --allow-missing-folds"
        )
    finished = folds.finished if folds is not None else [job for job in jobs if os.path.lexists(job / "metrics.json")]
    runs = [read_metrics(job / "metrics.json") for job in finished]
    if not runs:
        raise DataError(f"no */metrics.json under {str(multirun_dir)!r}: has the multirun finished a job?")
    names = sorted(set.intersection(*(set(run) for run in runs)))
    summary = {}
    for name in names:
        if name.split("/")[0] in ("val", "test", "severity"):
            values = np.array([run[name] for run in runs], dtype=float)
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            summary[name] = {"mean": float(values.mean()), "std": std, "min": float(values.min()),
                             "max": float(values.max()), "n": len(values)}  # fmt: skip
    if not summary:
        raise DataError(f"the jobs under {str(multirun_dir)!r} share no val/, test/ or severity/ metric to summarise")
    return summary


MARKDOWN_HEADER = "| metric | mean | std |"  # how each summary's table starts (earlier ones too)


def markdown(summary: dict[str, dict[str, float]]) -> str:
    lines = [f"{MARKDOWN_HEADER} min | max | runs |", "|---|---:|---:|---:|---:|---:|"]
    lines += [
        f"| {name} | {s['mean']:.4f} | {s['std']:.4f} | {s['min']:.4f} | {s['max']:.4f} | {s['n']} |"
        for name, s in summary.items()
    ]
    return "\n".join(lines) + "\n"
