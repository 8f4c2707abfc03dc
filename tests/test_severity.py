import numpy as np
import pytest

from covidseg.inference.severity import agreement, severity, split_lungs, zone_masks


def _two_lungs() -> np.ndarray:
    """Image-left lung (patient's right) 60 rows x 20 cols, image-right lung 60 x 30."""
    lung = np.zeros((100, 100), bool)
    lung[20:80, 10:30] = True
    lung[20:80, 60:90] = True
    return lung


def test_left_and_right_follow_the_pa_convention() -> None:
    right, left = split_lungs(_two_lungs())
    assert right[:, :50].sum() == 1200 and not right[:, 50:].any()  # patient's right: image's left
    assert left[:, 50:].sum() == 1800 and not left[:, :50].any()


def test_one_component_is_split_at_the_centre_line() -> None:
    lung = np.zeros((10, 10), bool)
    lung[2:8, 2:8] = True
    right, left = split_lungs(lung)
    assert right.sum() == left.sum() == 18 and not right[:, 5:].any()


def test_zones_are_thirds_of_each_lungs_height() -> None:
    upper, middle, lower = zone_masks(_two_lungs())
    assert [np.nonzero(z.any(1))[0][[0, -1]].tolist() for z in (upper, middle, lower)] == [[20, 39], [40, 59], [60, 79]]


def test_known_percentages_and_zone_score() -> None:
    lung = _two_lungs()
    infection = np.zeros_like(lung)
    infection[60:80, 60:90] = True  # the patient's left lower third: 600 of 1800 pixels
    infection[20:22, 10:30] = True  # 40 px of the right upper zone (400 px): 10 % > 5 %
    infection[40:41, 10:14] = True  # 4 px of the right middle zone: 1 % < 5 %
    result = severity(lung, infection)
    assert result["left_lung_infected_percent"] == pytest.approx(100 * 600 / 1800)
    assert result["right_lung_infected_percent"] == pytest.approx(100 * 44 / 1200)
    assert result["lung_infected_percent"] == pytest.approx(100 * 644 / 3000)
    assert (result["left_lower_zone"], result["right_upper_zone"], result["right_middle_zone"]) == (1, 1, 0)
    assert result["zone_score"] == 2
    assert severity(lung, infection, zone_threshold=0.2)["zone_score"] == 1


def test_infection_outside_the_lungs_does_not_count() -> None:
    infection = np.zeros((100, 100), bool)
    infection[:10] = True
    assert severity(_two_lungs(), infection)["lung_infected_percent"] == 0


def _rows(percents: list[tuple[float, float, float]], scores: list[int]) -> list[dict]:
    """Severity rows: (right, left, both) percent infected and the zone score."""
    return [
        {"right_lung_infected_percent": right, "left_lung_infected_percent": left, "lung_infected_percent": both}
        | {"zone_score": score}
        for (right, left, both), score in zip(percents, scores, strict=True)
    ]


def test_agreement_of_predicted_and_true_severity() -> None:
    truth = _rows([(10, 10, 10), (60, 40, 50), (0, 0, 0), (30, 20, 25)], [1, 4, 0, 2])
    perfect = agreement(truth, truth)
    assert perfect["severity/percent_infected_mae"] == 0 == perfect["severity/percent_infected_bias"]
    assert perfect["severity/percent_infected_limit_low"] == 0 == perfect["severity/percent_infected_limit_high"]
    assert perfect["severity/percent_infected_pearson_r"] == pytest.approx(1.0)
    assert perfect["severity/zone_score_exact"] == 1.0 == perfect["severity/zone_score_within_one"]
    assert perfect["severity/zone_score_kappa"] == pytest.approx(1.0)
    # 10 points too high everywhere, zone scores one off on two images and three off on one
    off = _rows([(20, 20, 20), (70, 50, 60), (10, 10, 10), (40, 30, 35)], [1, 5, 3, 1])
    result = agreement(off, truth)
    assert result["severity/percent_infected_mae"] == pytest.approx(10)
    assert result["severity/right_lung_percent_mae"] == pytest.approx(10) == result["severity/left_lung_percent_mae"]
    assert result["severity/percent_infected_bias"] == pytest.approx(10)  # a constant bias: the limits close on it
    assert result["severity/percent_infected_limit_low"] == pytest.approx(10)
    assert result["severity/percent_infected_limit_high"] == pytest.approx(10)
    assert result["severity/percent_infected_pearson_r"] == pytest.approx(1.0)
    assert result["severity/zone_score_exact"] == pytest.approx(1 / 4)
    assert result["severity/zone_score_within_one"] == pytest.approx(3 / 4)
    assert 0 < result["severity/zone_score_kappa"] < 1
    # one image, or percentages that never vary: no limits, no correlation, rather than NaN
    assert "severity/percent_infected_limit_low" not in agreement(off[:1], truth[:1])
    flat = _rows([(0, 0, 0)] * 4, [0] * 4)
    assert "severity/percent_infected_pearson_r" not in agreement(flat, truth)
    assert "severity/zone_score_kappa" not in agreement(flat, flat)
    # scattered differences: Bland-Altman limits are the mean difference +- 1.96 sample SDs
    scattered = _rows([(15, 15, 15), (40, 40, 40), (0, 0, 0), (35, 35, 35)], [1, 4, 0, 2])
    spread = agreement(scattered, truth)
    differences = np.array([5, -10, 0, 10])
    assert spread["severity/percent_infected_bias"] == pytest.approx(differences.mean())
    assert spread["severity/percent_infected_limit_high"] == pytest.approx(
        differences.mean() + 1.96 * differences.std(ddof=1)
    )


@pytest.mark.slow
def test_lung_and_infection_model_reports_both_and_grades_severity(compose_cfg, tmp_path) -> None:
    import csv
    from pathlib import Path

    from conftest import FAST

    from covidseg.eval import evaluate
    from covidseg.predict import predict
    from covidseg.train import train

    targets = "data.targets=[lung,infection]"
    cfg = compose_cfg("train", [*FAST, targets, "data.classes=[COVID-19,Normal]", "test=false"])
    metrics, _ = train(cfg)
    assert {"val/dice", "val/dice_lung", "val/dice_infection"} <= set(metrics)
    assert metrics["val/dice"] == metrics["val/dice_infection"]  # the monitored metric stays infection
    checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"

    data = [o for o in FAST if o.startswith("data") and not o.startswith("data.image_size")]
    eval_classes = "data.classes=[COVID-19,Normal]"
    eval_metrics = evaluate(compose_cfg("eval", [f"ckpt_path={checkpoint}", *data, eval_classes, "data.split=Val"]))
    assert {"severity/percent_infected_mae", "severity/zone_score_kappa", "test/dice_lung"} <= set(eval_metrics)
    assert eval_metrics["test/empty_truth_images"] == 4  # the Normal phantoms
    with (tmp_path / "outputs" / "run" / "per_image.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    healthy = [float(r["predicted_area_infection"]) for r in rows if float(r["truth_area_infection"]) == 0]
    expected_rate = sum(area < 0.01 * 64**2 for area in healthy) / len(healthy)
    assert eval_metrics["test/empty_truth_clean"] == pytest.approx(expected_rate)
    row = rows[0]
    assert {"predicted_zone_score", "true_zone_score", "true_lung_infected_percent", "dice_lung"} <= set(row)
    report = (tmp_path / "outputs" / "run" / "report.html").read_text()
    assert "Severity: percent of lung infected" in report and report.count("data:image/png;base64,") == 5

    image = next((Path(cfg.data.root) / "Val" / "COVID-19" / "images").glob("*.png"))
    predict_cfg = compose_cfg("predict", [f"ckpt_path={checkpoint}", f"input={image}", f"output={tmp_path / 'p'}"])
    with predict(predict_cfg).csv_path.open() as handle:
        row = next(csv.DictReader(handle))
    assert 0 <= int(row["zone_score"]) <= 6 and (tmp_path / "p" / f"{image.name}.lung.png").is_file()
