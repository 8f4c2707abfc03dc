"""What ``compare`` leaves: a table in Markdown and CSV, and a plot of per-image Dice, model against
model, with the distribution of their differences."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from covidseg.core.visualize import figure_png  # noqa: E402
from covidseg.core.writing import write_atomic, write_csv  # noqa: E402

COLUMNS = ("figure", "model", "images", "value", "low", "high", "difference", "difference_low",
           "difference_high", "test", "p", "p_adjusted")  # fmt: skip


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown(rows: Sequence[dict[str, Any]], labels: dict[str, str]) -> str:
    """The table people read: each model's figure with its interval; for the others, B - A with its
    interval, the paired test and its p-value (adjusted for the number of comparisons)."""
    lines = [
        "| figure | model | value [95 % interval] | B - A [95 % interval] | paired test | p | p adjusted |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        value = f"{row['value']:.4f} [{row['low']:.4f}, {row['high']:.4f}]"
        if "difference" in row:
            difference = f"{row['difference']:+.4f} [{row['difference_low']:+.4f}, {row['difference_high']:+.4f}]"
            test = (row["test"], f"{row['p']:.3g}", f"{row['p_adjusted']:.3g}")
        else:
            difference, test = "(reference)", ("", "", "")
        lines.append(
            f"| {row['figure']} | {labels[row['model']]} | {value} | {difference} | " + " | ".join(test) + " |"
        )
    return "\n".join(lines) + "\n"


def write_comparison(folder: Path, rows: Sequence[dict[str, Any]], labels: dict[str, str],
                     dice: dict[str, np.ndarray], evaluated: dict[str, str] | None = None,
                     plotted: str = "per-image Dice") -> list[Path]:  # fmt: skip
    """``comparison.md``, ``comparison.csv`` and ``comparison.png`` (per-image Dice of each model
    against the reference, and the differences' histogram); ``evaluated``: the model each eval
    folder compare made itself was an eval of; ``plotted``: what the Dice values are, for the axes."""
    table = markdown(rows, labels)
    sources = evaluated or {}
    legend = "\n".join(f"- {label}: `{run}`" + (f", the eval of `{sources[run]}`" if run in sources else "")
                       for run, label in labels.items())  # fmt: skip
    written = [write_atomic(folder / "comparison.md", f"{table}\n{legend}\n")]
    written.append(write_csv(folder / "comparison.csv", COLUMNS, ([_number(row.get(key, "")) for key in COLUMNS]
                                                                 for row in rows)))  # fmt: skip
    models = list(dice)
    reference = dice[models[0]]
    figure, axes = plt.subplots(len(models) - 1, 2, figsize=(9, 4 * (len(models) - 1)), squeeze=False)
    for row_axes, model in zip(axes, models[1:], strict=True):
        scatter, histogram = row_axes
        scatter.scatter(reference, dice[model], s=8, alpha=0.5, color="#c0392b")
        scatter.plot([0, 1], [0, 1], color="gray", linewidth=1)
        scatter.set_xlabel(f"{plotted}, {labels[models[0]]}")
        scatter.set_ylabel(f"{plotted}, {labels[model]}")
        differences = dice[model] - reference
        limit = max(float(np.abs(differences).max()), 0.01)  # the differences' own scale, centred on 0
        histogram.hist(differences, bins=41, range=(-limit, limit), color="#2c3e50")
        histogram.axvline(0, color="gray", linewidth=1)
        histogram.set_xlabel(f"{labels[model]} - {labels[models[0]]}, per image")
        histogram.set_ylabel("images")
    figure.tight_layout()
    written.append(write_atomic(folder / "comparison.png", figure_png(figure)))
    return written
