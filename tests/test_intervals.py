"""Bootstrap intervals checked against answers known in advance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST

from covidseg.core.errors import ConfigError
from covidseg.evaluation.intervals import bootstrap_interval, check_resamples, eval_intervals, mean_of
from covidseg.inference.severity import agreement


def test_intervals_cover_the_true_mean_about_95_times_in_100() -> None:
    rng = np.random.default_rng(0)
    covered = 0
    for trial in range(200):
        sample = rng.beta(4, 2, size=80)  # a Dice-like skewed distribution, true mean 2/3
        low, high = bootstrap_interval(mean_of, (sample,), resamples=500, seed=trial)
        covered += low <= 2 / 3 <= high
    assert 0.90 <= covered / 200 <= 0.99, covered


def test_identical_images_give_a_zero_width_interval_and_reruns_the_same_one() -> None:
    low, high = bootstrap_interval(mean_of, (np.full(50, 0.8),), resamples=500, seed=1)
    assert low == high == pytest.approx(0.8)
    sample = np.random.default_rng(3).random(60)
    assert bootstrap_interval(mean_of, (sample,), 500, seed=7) == bootstrap_interval(mean_of, (sample,), 500, seed=7)


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


def test_severity_figures_match_agreement_and_get_intervals() -> None:
    """The resampled severity statistics equal eval's own figures (torchmetrics' kappa, SciPy's r)
    on the same images, and each gets an interval around it."""
    rng = np.random.default_rng(5)
    true_percent = rng.uniform(0, 60, 120)
    predicted_percent = np.clip(true_percent + rng.normal(3, 8, 120), 0, 100)
    true_score = rng.integers(0, 7, 120)
    predicted_score = np.clip(true_score + rng.integers(-2, 3, 120), 0, 6)
    rows = [
        [{"lung_infected_percent": p, "zone_score": int(z), "right_lung_infected_percent": 0.0,
          "left_lung_infected_percent": 0.0} for p, z in zip(percents, scores, strict=True)]
        for percents, scores in ((predicted_percent, predicted_score), (true_percent, true_score))
    ]  # fmt: skip
    expected = agreement(*rows)
    columns = {
        "dice_infection": list(rng.random(120)),
        "iou_infection": list(rng.random(120)),
        "intersection_infection": [1] * 120,
        "truth_area_infection": [2] * 120,
        "predicted_area_infection": [2] * 120,
        "predicted_lung_infected_percent": list(predicted_percent),
        "true_lung_infected_percent": list(true_percent),
        "predicted_zone_score": list(predicted_score),
        "true_zone_score": list(true_score),
    }
    intervals = eval_intervals(columns, "infection", clean_area=5, resamples=300, seed=0)
    for name in ("percent_infected_mae", "percent_infected_bias", "percent_infected_pearson_r", "zone_score_exact",
                 "zone_score_within_one", "zone_score_kappa"):  # fmt: skip
        figure = intervals[f"severity/{name}"]
        assert figure["value"] == pytest.approx(expected[f"severity/{name}"], abs=1e-6), name
        assert figure["low"] < figure["value"] < figure["high"], name
    assert 2 < intervals["severity/percent_infected_bias"]["value"] < 4  # the shift put in


def test_a_figure_undefined_on_most_resamples_gets_no_interval_rather_than_nan() -> None:
    """29 images graded alike and one not: the kappa of most resamples is undefined (every score the
    same), so no interval is given for it, and nothing written is NaN."""
    scores = [2] * 29 + [4]
    columns = {
        "dice_infection": [0.5] * 30, "iou_infection": [0.3] * 30, "intersection_infection": [1] * 30,
        "truth_area_infection": [2] * 30, "predicted_area_infection": [2] * 30,
        "predicted_lung_infected_percent": [10.0] * 29 + [30.0], "true_lung_infected_percent": [10.0] * 30,
        "predicted_zone_score": scores, "true_zone_score": [2] * 30,
    }  # fmt: skip
    intervals = eval_intervals(columns, "infection", clean_area=5, resamples=300, seed=0)
    assert all(np.isfinite([figure["value"], figure["low"], figure["high"]]).all() for figure in intervals.values())
    json.dumps(intervals, allow_nan=False)
    assert "severity/percent_infected_mae" in intervals


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


def _eval_run(
    folder: Path, dice: np.ndarray, names: list[str] | None = None, split: str = "Val", target: str = "infection"
) -> Path:
    """An eval run folder as ``eval`` leaves it: per_image.csv, intervals.json and the recorded config."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(
        f"data:\n  split: {split}\n  classes: [COVID-19]\n  image_size: 64\n"
    )
    names = names or [f"Val/COVID-19/{index}.png" for index in range(len(dice))]
    truth = np.where(np.arange(len(dice)) % 5 == 0, 0, 1000)  # every fifth image healthy
    predicted = np.where(truth == 0, np.where(dice > 0.5, 0, 100), 1000)
    intersection = np.round(dice * (truth + predicted) / 2)
    (folder / "intervals.json").write_text(json.dumps({"target": target, "image_size": 64, "intervals": {}}))
    lines = ["file," + ",".join(f"{key}_{target}" for key in ("dice", "iou", "truth_area", "predicted_area",
                                                               "intersection"))]  # fmt: skip
    lines += [f"{n},{d:.6g},{d / (2 - d):.6g},{t},{p},{i:g}" for n, d, t, p, i in
              zip(names, dice, truth, predicted, intersection, strict=True)]  # fmt: skip
    (folder / "per_image.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_compare_finds_no_difference_between_identical_models_and_recovers_a_known_one(tmp_path: Path) -> None:
    from covidseg.evaluation.comparison import compare, read_eval_run

    dice = np.random.default_rng(0).beta(4, 2, size=200)
    a = read_eval_run(_eval_run(tmp_path / "a", dice))
    same = read_eval_run(_eval_run(tmp_path / "same", dice))
    better = read_eval_run(_eval_run(tmp_path / "better", np.minimum(dice + 0.05, 1.0)))
    rows = {(row["figure"], row["model"]): row for row in compare([a, same, better], resamples=500)}
    identical = rows[("dice", str(tmp_path / "same"))]
    assert identical["difference"] == 0 and identical["difference_low"] <= 0 <= identical["difference_high"]
    assert identical["p"] == 1.0
    shifted = rows[("dice", str(tmp_path / "better"))]
    true_shift = float(np.mean(np.minimum(dice + 0.05, 1.0) - dice))
    assert shifted["difference"] == pytest.approx(true_shift, abs=1e-5)
    assert shifted["difference_low"] <= true_shift <= shifted["difference_high"] and shifted["p"] < 0.01
    assert rows[("dice_pooled", str(tmp_path / "better"))]["p"] < 0.01
    # every fifth image is healthy: the infected images' Dice is reported alone too (calibrate's figure)
    infected = np.arange(len(dice)) % 5 != 0
    alone = rows[("dice_infected", str(tmp_path / "better"))]
    shifted_infected = np.minimum(dice + 0.05, 1.0)[infected]
    assert alone["images"] == infected.sum() and alone["value"] == pytest.approx(shifted_infected.mean())
    assert rows[("dice_infected", str(tmp_path / "a"))]["value"] == pytest.approx(dice[infected].mean())


def test_compare_refuses_runs_on_other_images_and_writes_its_table_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from helpers import run_command

    from covidseg.compare import main

    dice = np.random.default_rng(1).beta(4, 2, size=40)
    a = _eval_run(tmp_path / "a", dice)
    other_images = _eval_run(tmp_path / "b", dice, names=[f"Val/Normal/{index}.png" for index in range(40)])
    assert run_command(main, str(a), str(other_images)) == 2
    assert "scored other images ('Val/Normal/0.png' where 'Val/COVID-19/0.png')" in capsys.readouterr().err
    on_train = _eval_run(tmp_path / "c", dice, split="Train")
    assert run_command(main, str(a), str(on_train)) == 2
    assert "was evaluated with data.split='Train'" in capsys.readouterr().err
    b = _eval_run(tmp_path / "d", np.clip(dice - 0.02, 0, 1))
    assert run_command(main, str(a), str(b), "--resamples", "200", "--out", str(tmp_path / "out")) == 0
    (written,) = (tmp_path / "out").iterdir()
    assert sorted(path.name for path in written.iterdir()) == [
        ".covidseg-run", "comparison.csv", "comparison.md", "comparison.png"
    ]  # fmt: skip
    table = (written / "comparison.md").read_text()
    assert "| dice | B | " in table and "| paired permutation |" in table
    assert "| healthy_clean | B | " in table and "| McNemar exact (no image differs) | 1 | 1 |" in table
    assert run_command(main, str(a), str(a)) == 2
    assert "is given twice" in capsys.readouterr().err
    lungs = _eval_run(tmp_path / "e", dice, target="lung")
    assert run_command(main, str(a), str(lungs)) == 2
    assert "was evaluated with target='lung'" in capsys.readouterr().err
    (b / "intervals.json").unlink()  # an eval from before covidseg recorded what it scored
    assert run_command(main, str(a), str(b)) == 2
    assert "intervals.json" in capsys.readouterr().err


def test_compare_says_which_backend_each_eval_ran_on(tmp_path: Path) -> None:
    from covidseg.core.errors import DataError
    from covidseg.evaluation.comparison import recorded_backend

    path = tmp_path / "run_info.json"
    assert recorded_backend(path) == "not recorded"  # an eval before covidseg recorded it
    path.write_text(json.dumps({"command": ["eval"]}))
    assert recorded_backend(path) == "not recorded"
    path.write_text(json.dumps({"backend": "openvino_int8", "bf16": True}))
    assert recorded_backend(path) == "openvino_int8, bf16"
    for bad in ({"backend": "tensorrt\x1b[31m", "bf16": True}, {"backend": "torch", "bf16": "yes"}, [1]):
        path.write_text(json.dumps(bad))
        with pytest.raises(DataError, match="run_info.json"):
            recorded_backend(path)


def test_compare_evaluates_models_itself_as_eval_would(
    trained_checkpoints: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from helpers import run_command

    from covidseg.compare import main

    data = [o for o in FAST if o.startswith("data")]
    settings = ["--eval", *data, f"paths.cache_dir={tmp_path / 'cache'}", f"paths.log_dir={tmp_path / 'logs'}",
                "trainer.enable_progress_bar=false", "--resamples", "200", "--out", str(tmp_path / "out")]  # fmt: skip
    # the second model by a path Hydra would parse (Lightning's own checkpoint names hold "=")
    named = tmp_path / "epoch=0-step=2 (copy).ckpt"
    named.write_bytes(trained_checkpoints[1].read_bytes())
    models = [str(trained_checkpoints[0]), str(named)]
    assert run_command(main, *models, *settings) == 0
    (written,) = (tmp_path / "out").iterdir()
    for label, model in zip("AB", models, strict=True):
        assert "data=synthetic" in (written / "evals" / label / ".hydra" / "overrides.yaml").read_text()
        assert (written / "evals" / label / "per_image.csv").is_file()
        assert (
            f"- {label}: `{written / 'evals' / label}`, the eval of `{model}`"
            in (written / "comparison.md").read_text()
        )
    assert "| dice | B | " in (written / "comparison.md").read_text()
    assert f"A: {models[0]} (evaluated into {written / 'evals' / 'A'}); ran on torch, fp32" in capsys.readouterr().out
    # a model eval cannot read: its error in one line, exit 2
    missing = tmp_path / "missing.ckpt"
    assert run_command(main, str(missing), models[0], *settings[:-2], "--out", str(tmp_path / "failed")) == 2
    error = capsys.readouterr().err
    assert f"eval of '{missing}' failed (exit 2)" in error and len(error.strip().splitlines()) == 1
    for taken in ("ckpt_path=x.ckpt", "hydra.run.dir=/tmp/x"):
        assert run_command(main, *models, "--out", str(tmp_path / "refused"), "--eval", taken) == 2
        assert f"--eval {taken}: compare sets the model" in capsys.readouterr().err
