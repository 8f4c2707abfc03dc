"""Bootstrap intervals checked against answers known in advance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST

from covidseg.core.errors import ConfigError
from covidseg.evaluation.intervals import _mean, bootstrap_interval, check_resamples, eval_intervals


def test_intervals_cover_the_true_mean_about_95_times_in_100() -> None:
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        sample = rng.beta(4, 2, size=80)  # a Dice-like skewed distribution, true mean 2/3
        low, high = bootstrap_interval(_mean, (sample,), resamples=500, seed=trial)
        covered += low <= 2 / 3 <= high
    assert 0.90 <= covered / 200 <= 0.99, covered


def test_identical_images_give_a_zero_width_interval_and_reruns_the_same_one() -> None:
    low, high = bootstrap_interval(_mean, (np.full(50, 0.8),), resamples=500, seed=1)
    assert low == high == pytest.approx(0.8)
    sample = np.random.default_rng(3).random(60)
    assert bootstrap_interval(_mean, (sample,), 500, seed=7) == bootstrap_interval(_mean, (sample,), 500, seed=7)


def test_pooled_figures_and_the_clean_rate_match_their_definitions() -> None:
    columns = {
        "dice_infection": [1.0, 0.5, 0.0, 1.0],
        "iou_infection": [1.0, 1 / 3, 0.0, 1.0],
        "intersection_infection": [10, 5, 0, 0],
        "truth_area_infection": [10, 10, 10, 0],
        "predicted_area_infection": [10, 10, 0, 0],
    }
    intervals = eval_intervals(columns, "infection", clean_area=5, resamples=200, seed=0)
    assert intervals["test/dice"]["value"] == pytest.approx(0.625)
    assert intervals["test/dice_pooled"]["value"] == pytest.approx(2 * 15 / 50)
    assert intervals["test/iou_pooled"]["value"] == pytest.approx(15 / 35)
    assert intervals["test/empty_truth_clean"] == {"value": 1.0, "low": 1.0, "high": 1.0, "images": 1}
    assert all(v["low"] <= v["value"] <= v["high"] for v in intervals.values())


@pytest.mark.parametrize("resamples", [10, 10**7, "many", 2.5, True])
def test_resamples_out_of_range_are_one_line(resamples: object) -> None:
    with pytest.raises(ConfigError, match=r"stats.resamples=.*expected a whole number from 100 to 100,000"):
        check_resamples(resamples)


def test_eval_writes_each_figure_with_its_interval(compose_cfg, trained_checkpoints: list[Path]) -> None:
    from covidseg.eval import evaluate

    data = [o for o in FAST if o.startswith("data")]
    cfg = compose_cfg("eval", [f"ckpt_path={trained_checkpoints[0]}", *data, "stats.resamples=300"])
    metrics = evaluate(cfg)
    written = json.loads((Path(cfg.paths.output_dir) / "intervals.json").read_text())
    assert written["method"] == "BCa bootstrap over images, 300 resamples, seed 42"
    for name in ("test/dice", "test/iou", "test/dice_pooled", "test/iou_pooled"):
        interval = written["intervals"][name]
        assert interval["value"] == pytest.approx(metrics[name], abs=1e-6), name
        assert interval["low"] <= interval["value"] <= interval["high"], name
    report = (Path(cfg.paths.output_dir) / "report.html").read_text()
    dice = written["intervals"]["test/dice"]
    assert f"[{dice['low']:.4f}, {dice['high']:.4f}]" in report
