"""Learning curves of a run, rendered from its TensorBoard events, and its score by wall time
(``python -m covidseg.learning_curves <run folder>``)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from covidseg.core.errors import ConfigError, DataError  # noqa: E402
from covidseg.core.run_files import read_run_file  # noqa: E402
from covidseg.core.visualize import PNG_SOFTWARE, figure_png  # noqa: E402
from covidseg.core.writing import refuse_unless_ours, write_atomic, write_csv  # noqa: E402


def run_started(run_dir: Path) -> float:
    """When the run began, from its ``run_info.json``: the origin of its score-by-time curve, and
    the sign that ``run_dir`` is a covidseg run folder, the only kind this command writes into."""
    info_path = run_dir / "run_info.json"
    if not info_path.is_file():
        raise ConfigError(
            f"{str(run_dir)!r} has no run_info.json: not a covidseg run folder "
            "(the curves are written into the run folder they are read from)"
        )
    started = read_run_file(info_path).get(
        "started", info_path.stat().st_mtime
    )  # older runs: when the file was written
    if isinstance(started, bool) or not isinstance(started, int | float) or not math.isfinite(started):
        raise DataError(f"{str(info_path)!r}: started={started!r}, expected seconds since the epoch")
    return float(started)


def read_scalars(run_dir: Path) -> dict[str, list]:
    """Every scalar series of a run's TensorBoard events: tag -> [ScalarEvent(wall_time, step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = sorted(path for path in run_dir.rglob("events.out.tfevents.*") if path.is_file())  # no FIFO
    if not event_files:
        raise DataError(f"no TensorBoard events under {str(run_dir)!r} (was the run's logger TensorBoard?)")
    series: dict[str, list] = {}
    for event_file in event_files:
        events = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            series.setdefault(tag, []).extend(events.Scalars(tag))
    if not series:
        raise DataError(f"the TensorBoard events under {str(run_dir)!r} hold no scalars: empty or damaged")
    return series


def learning_curves(run_dir: Path, series: dict[str, list] | None = None) -> Path:
    """Plot every ``*/loss`` and ``val/*`` scalar of a run's TensorBoard events to one PNG."""
    series = read_scalars(run_dir) if series is None else series
    scalars = {
        tag: ([p.step for p in points], [p.value for p in points])
        for tag, points in series.items()
        if tag.endswith("loss_epoch") or tag.startswith("val/") or tag == "train/loss"
    }
    losses = {tag: v for tag, v in scalars.items() if "loss" in tag}
    scores = {tag: v for tag, v in scalars.items() if "loss" not in tag}
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for axes, group, ylabel in ((left, losses, "loss"), (right, scores, "score")):
        for tag, (steps, values) in sorted(group.items()):
            axes.plot(steps, values, label=tag, marker="." if len(steps) < 50 else None)
        axes.set_xlabel("training step")
        axes.set_ylabel(ylabel)
        if group:
            axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    path = run_dir / "learning_curves.png"
    mark = b"Software\x00" + PNG_SOFTWARE.encode()  # the text entry figure_png writes
    refuse_unless_ours(path, "write the learning curves", lambda head: head.startswith(b"\x89PNG") and mark in head)
    write_atomic(path, figure_png(figure))
    return path


def score_by_time(
    run_dir: Path, tag: str = "val/dice", series: dict[str, list] | None = None, started: float | None = None
) -> Path:
    """``tag`` against minutes since the run started (``run_info.json``), to ``<tag>_by_time.csv``:
    what a recipe reaches within a time budget."""
    started = run_started(run_dir) if started is None else started
    series = read_scalars(run_dir) if series is None else series
    rows = sorted(((p.wall_time - started) / 60, p.step, p.value) for p in series.get(tag, []))
    table = ((f"{minutes:.2f}", step, f"{value:.4f}") for minutes, step, value in rows)
    path, header = run_dir / f"{tag.replace('/', '_')}_by_time.csv", ["minutes", "step", tag]
    refuse_unless_ours(
        path, "write the learning curves", lambda head: head.startswith(",".join(header).encode() + b"\r\n")
    )
    return write_csv(path, header, table)
