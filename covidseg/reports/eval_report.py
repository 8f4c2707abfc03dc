"""The HTML evaluation report: metrics, a histogram of per-image Dice, severity agreement and
galleries of the best, median and worst cases, all in one self-contained page."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from covidseg.core.visualize import comparison_row, figure_png  # noqa: E402
from covidseg.core.writing import write_atomic
from covidseg.inference.predictor import Forward, Predictor  # noqa: E402

GALLERY_SIZE = 4


def _png_bytes(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


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
    intervals: Mapping[str, Mapping[str, float]] | None = None,
    forward: Forward | None = None,
) -> Path:
    """``report.html`` (self-contained) plus ``gallery/{best,median,worst}.png``, the gallery's masks
    by ``predictor`` (through ``forward``, the backend eval measured, where it is not torch); with
    ``severity_pairs`` (predicted, true percent of lung infected) a scatter of the two."""
    figure, axes = plt.subplots(figsize=(6, 3))
    axes.hist(dice, bins=20, range=(0, 1), color="#c0392b")
    axes.set_xlabel("per-image Dice")
    axes.set_ylabel("images")
    histogram = figure_png(figure)

    charts = [f"<h2>Per-image Dice</h2>{_img_tag(histogram, 'histogram of per-image Dice')}"]
    if severity_pairs is not None:
        predicted, true = severity_pairs
        figure, axes = plt.subplots(figsize=(4, 4))
        axes.scatter(true, predicted, s=8, alpha=0.6, color="#c0392b")
        axes.plot([0, 100], [0, 100], color="gray", linewidth=1)
        axes.set_xlabel("true % of lung infected")
        axes.set_ylabel("predicted % of lung infected")
        scatter = _img_tag(figure_png(figure), "predicted vs true percent of lung infected")
        charts.append(f"<h2>Severity: percent of lung infected</h2>{scatter}")

    gallery_dir = output_dir / "gallery"
    gallery_dir.mkdir(parents=True, exist_ok=True)
    sections = []
    channel = predictor.targets.index(predictor.primary_target)
    for label, indices in gallery_indices(dice).items():
        samples = [dataset[index] for index in indices]
        masks = predictor.predict(torch.stack([s["image"] for s in samples]), forward).mask[:, channel].numpy()
        rows = [
            comparison_row((s["image"][0].numpy() * 255).astype(np.uint8), s["mask"][channel].numpy(), mask)
            for s, mask in zip(samples, masks, strict=True)
        ]
        png = _png_bytes(np.concatenate(rows, axis=0))
        write_atomic(gallery_dir / f"{label}.png", png)
        captions = ", ".join(f"{html.escape(names[i])} (Dice {dice[i]:.3f})" for i in indices)
        sections.append(f"<h2>{label.title()} cases</h2><p>{captions}</p>{_img_tag(png, label)}")

    def interval(name: str) -> str:
        found = (intervals or {}).get(name)
        return f"[{found['low']:.4f}, {found['high']:.4f}]" if found else ""

    table = "<tr><th>metric</th><th>value</th><th>95 % interval</th></tr>" + "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td><td>{interval(k)}</td></tr>" for k, v in sorted(metrics.items())
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}td{{padding:2px 12px}}
img{{max-width:100%}}</style></head><body>
<h1>{html.escape(title)}</h1>
<table>{table}</table>
<p>Dice and IoU are per-image means (an image with empty truth and prediction scores 1); *_pooled
pool all pixels; the intervals are a bootstrap over the images (intervals.json). Columns: X-ray |
truth (green) | prediction (red).</p>
{"".join(charts)}
{"".join(sections)}
</body></html>
"""
    path = output_dir / "report.html"
    write_atomic(path, page)
    return path
