"""Reports people would rather look at than read: an HTML evaluation report with galleries,
and learning curves rendered from TensorBoard events.

python -m covidseg.report <run folder>    (learning_curves.png from the run's TensorBoard events)
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from covidseg.predictor import Predictor  # noqa: E402
from covidseg.visualize import comparison_row  # noqa: E402

GALLERY_SIZE = 4


def _png_bytes(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def _figure_png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def gallery_indices(dice: Sequence[float], size: int = GALLERY_SIZE) -> dict[str, list[int]]:
    """Indices of the best, median and worst images by Dice."""
    order = [int(i) for i in np.argsort(np.asarray(dice), kind="stable")]
    middle = max(0, len(order) // 2 - size // 2)
    return {"best": order[::-1][:size], "median": order[middle : middle + size], "worst": order[:size]}


def write_eval_report(
    output_dir: Path,
    title: str,
    metrics: Mapping[str, float],
    names: Sequence[str],
    dice: Sequence[float],
    predictor: Predictor,
    dataset: torch.utils.data.Dataset,
    severity_pairs: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Path:
    """``report.html`` (self-contained) plus ``gallery/{best,median,worst}.png``; with
    ``severity_pairs`` (predicted, true percent of lung infected) a scatter of the two."""
    figure, axes = plt.subplots(figsize=(6, 3))
    axes.hist(dice, bins=20, range=(0, 1), color="#c0392b")
    axes.set_xlabel("per-image Dice")
    axes.set_ylabel("images")
    histogram = _figure_png(figure)

    charts = [f"<h2>Per-image Dice</h2>{_img_tag(histogram, 'histogram of per-image Dice')}"]
    if severity_pairs is not None:
        predicted, true = severity_pairs
        figure, axes = plt.subplots(figsize=(4, 4))
        axes.scatter(true, predicted, s=8, alpha=0.6, color="#c0392b")
        axes.plot([0, 100], [0, 100], color="gray", linewidth=1)
        axes.set_xlabel("true % of lung infected")
        axes.set_ylabel("predicted % of lung infected")
        scatter = _img_tag(_figure_png(figure), "predicted vs true percent of lung infected")
        charts.append(f"<h2>Severity: percent of lung infected</h2>{scatter}")

    gallery_dir = output_dir / "gallery"
    gallery_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    channel = predictor.targets.index(predictor.primary_target)
    for label, indices in gallery_indices(dice).items():
        samples = [dataset[index] for index in indices]
        masks = predictor.predict(torch.stack([s["image"] for s in samples])).mask[:, channel].numpy()
        rows = [
            comparison_row((s["image"][0].numpy() * 255).astype(np.uint8), s["mask"][channel].numpy(), mask)
            for s, mask in zip(samples, masks, strict=True)
        ]
        png = _png_bytes(np.concatenate(rows, axis=0))
        (gallery_dir / f"{label}.png").write_bytes(png)
        captions = ", ".join(f"{html.escape(names[i])} (Dice {dice[i]:.3f})" for i in indices)
        sections.append(f"<h2>{label.title()} cases</h2><p>{captions}</p>{_img_tag(png, label)}")

    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in sorted(metrics.items()))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}td{{padding:2px 12px}}
img{{max-width:100%}}</style></head><body>
<h1>{html.escape(title)}</h1>
<table>{table}</table>
<p>Dice and IoU are per-image means (an image with empty truth and prediction scores 1); *_pooled
pool all pixels. Columns: X-ray | truth (green) | prediction (red).</p>
{"".join(charts)}
{"".join(sections)}
</body></html>
"""
    path = output_dir / "report.html"
    path.write_text(page)
    return path


def read_scalars(run_dir: Path) -> dict[str, list]:
    """Every scalar series of a run's TensorBoard events: tag -> [ScalarEvent(wall_time, step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = sorted(run_dir.rglob("events.out.tfevents.*"))
    if not event_files:
        raise FileNotFoundError(f"no TensorBoard events under {str(run_dir)!r}")
    series: dict[str, list] = {}
    for event_file in event_files:
        events = EventAccumulator(str(event_file), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            series.setdefault(tag, []).extend(events.Scalars(tag))
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
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
    path = run_dir / "learning_curves.png"
    path.write_bytes(_figure_png(figure))
    return path


def score_by_time(run_dir: Path, tag: str = "val/dice", series: dict[str, list] | None = None) -> Path:
    """``tag`` against minutes since the run started (``run_info.json``), to ``<tag>_by_time.csv``:
    what a recipe reaches within a time budget."""
    info_path = run_dir / "run_info.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"no run_info.json in {str(run_dir)!r}: not a covidseg run folder")
    started = json.loads(info_path.read_text()).get("started", info_path.stat().st_mtime)
    series = read_scalars(run_dir) if series is None else series
    rows = sorted(((p.wall_time - started) / 60, p.step, p.value) for p in series.get(tag, []))
    path = run_dir / f"{tag.replace('/', '_')}_by_time.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["minutes", "step", tag])
        writer.writerows((f"{minutes:.2f}", step, f"{value:.4f}") for minutes, step, value in rows)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Render a run's learning curves from its TensorBoard events.")
    parser.add_argument("run_dir", type=Path, help="a run folder under outputs/")
    run_dir = parser.parse_args().run_dir
    series = read_scalars(run_dir)  # the event files are read once for both outputs
    print(learning_curves(run_dir, series))
    print(score_by_time(run_dir, series=series))


if __name__ == "__main__":
    main()
